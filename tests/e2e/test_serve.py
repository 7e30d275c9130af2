"""`crs-service serve` as a real process: readiness, scoring, bad input, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.models import mixed_items
from trainer_client.launch import ServiceProcess

TOKEN = "e2e-token-1234"
GOOD = {"items": [{"prompt": "How are you?", "response": "Well, thanks."}]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def strict_server(tiny_llama: Path) -> Iterator[ServiceProcess]:
    """A server with small limits so every refusal is cheap to provoke."""
    env = {
        "CRS_API_TOKENS": TOKEN,
        "CRS_MAX_ITEMS_PER_REQUEST": "8",
        "CRS_MAX_BODY_BYTES": "65536",
        "CRS_MAX_INPUT_TOKENS": "64",
    }
    with ServiceProcess(tiny_llama, env=env) as server:
        server.wait_ready()
        yield server


def item(prompt: Any = "hi", response: Any = "hello") -> dict[str, Any]:
    return {"prompt": prompt, "response": response}


BAD_INPUTS = {
    "malformed json": (b'{"items": [', 422),
    "not an object": (b"[1, 2]", 422),
    "items not a list": (json.dumps({"items": "x"}).encode(), 422),
    "response a number": (json.dumps({"items": [item(response=3)]}).encode(), 422),
    "empty prompt": (json.dumps({"items": [item(prompt="")]}).encode(), 422),
    "bad role": (
        json.dumps({"items": [item(prompt=[{"role": "wizard", "content": "x"}])]}).encode(),
        422,
    ),
    "too many items": (json.dumps({"items": [item()] * 9}).encode(), 413),
    "oversized body": (json.dumps({"items": [item(response="x" * 70000)]}).encode(), 413),
    "over-long item": (json.dumps({"items": [item(), item(response="word " * 200)]}).encode(), 422),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gets_the_envelope_and_the_server_keeps_serving(
    strict_server: ServiceProcess, case: str
) -> None:
    body, status = BAD_INPUTS[case]
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(f"{strict_server.url}/v1/rewards", content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "details"}
    assert error["message"]
    after = httpx.post(f"{strict_server.url}/v1/rewards", json=GOOD, headers=AUTH)
    assert after.status_code == 200


def test_over_long_item_error_names_its_index(strict_server: ServiceProcess) -> None:
    body = {"items": [item(), item(response="word " * 200)]}
    response = httpx.post(f"{strict_server.url}/v1/rewards", json=body, headers=AUTH)
    assert response.status_code == 422
    assert "item 1 " in response.json()["error"]["message"]
    assert [entry["index"] for entry in response.json()["error"]["details"]["items"]] == [1]


def test_left_truncation_on_request(strict_server: ServiceProcess) -> None:
    body = {"items": [item(response="word " * 200)], "truncation": "left"}
    response = httpx.post(f"{strict_server.url}/v1/rewards", json=body, headers=AUTH)
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert (result["truncated"], result["tokens"]) == (True, 64)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [({}, "missing"), ({"Authorization": "Bearer wrong-token-0"}, "invalid")],
    ids=["missing", "wrong"],
)
def test_token_required(
    strict_server: ServiceProcess, headers: dict[str, str], reason: str
) -> None:
    response = httpx.post(f"{strict_server.url}/v1/rewards", json=GOOD, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert reason in response.json()["error"]["message"]
    assert TOKEN not in response.text


def in_flight(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    match = re.search(r"^crs_requests_in_flight (\S+)$", metrics, re.MULTILINE)
    assert match, "crs_requests_in_flight is missing from /metrics"
    return float(match.group(1))


def test_sigterm_lets_the_request_in_flight_finish(tiny_llama: Path) -> None:
    items = mixed_items(2048, seed=3, max_words=150)
    outcome: dict[str, Any] = {}
    with ServiceProcess(tiny_llama) as server:
        server.wait_ready()

        def send() -> None:
            response = httpx.post(f"{server.url}/v1/rewards", json={"items": items}, timeout=300)
            outcome["status"], outcome["body"] = response.status_code, response.json()

        sender = threading.Thread(target=send)
        sender.start()
        # The /metrics request counts itself: more than one means the big request is inside.
        deadline = time.monotonic() + 60
        while in_flight(server.url) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.signal()
        assert sender.is_alive(), "the request finished before SIGTERM: the test proves nothing"
        sender.join(timeout=300)
        assert server.process is not None
        assert server.process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/livez")
    assert outcome["status"] == 200
    assert len(outcome["body"]["results"]) == len(items)


@pytest.mark.parametrize(
    ("setup", "message"),
    [("missing", "does not exist"), ("two-labels", "num_labels=2")],
)
def test_unusable_model_fails_at_start_with_a_clear_message(
    tmp_path: Path, tiny_bert: Path, setup: str, message: str
) -> None:
    model_dir = tmp_path / "model"
    if setup == "two-labels":
        from transformers import AutoModelForSequenceClassification

        AutoModelForSequenceClassification.from_pretrained(
            tiny_bert, num_labels=2, ignore_mismatched_sizes=True
        ).save_pretrained(model_dir)
    command = [sys.executable, "-m", "service", "serve", "--model", str(model_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_model_failing_after_preflight_stops_the_server(tiny_bert: Path, tmp_path: Path) -> None:
    """A base model passes the quick checks but has no trained head: the load fails in the
    background, `/readyz` never turns 200, and the process exits 1 naming the problem."""
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_bert)
    base.config.num_labels = 1
    base.save_pretrained(tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "base" / name).write_bytes((tiny_bert / name).read_bytes())
    server = ServiceProcess(tmp_path / "base").start()
    try:
        with pytest.raises(RuntimeError, match="random score head"):
            server.wait_ready(timeout_s=120)
        assert server.process is not None
        assert server.process.wait(timeout=30) == 1
    finally:
        server.stop()


REDIS_PASSWORD = "s3cretpass"
SHORT_TOKEN = "zq7!xk"


def test_redis_password_never_reaches_the_log(tiny_llama: Path) -> None:
    # Nothing listens on port 1: the store fails, and its failures are logged too.
    env = {"CRS_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0"}
    with ServiceProcess(tiny_llama, env=env) as server:
        server.wait_ready()
        # Contrastive by default: the request asks the unreachable store for baselines.
        httpx.post(f"{server.url}/v1/rewards", json=GOOD, timeout=60)
        code = server.stop()
        logged = server.log_path.read_text()
    assert "redis_url" in logged, "the settings line is missing: the test proves nothing"
    assert "redis://***@127.0.0.1:1/0" in logged
    assert REDIS_PASSWORD not in logged
    assert code == 0


@pytest.mark.parametrize(
    ("setting", "value"),
    [("CRS_API_TOKENS", f"long-enough-token,{SHORT_TOKEN}"), ("CRS_ADMIN_TOKEN", SHORT_TOKEN)],
)
def test_short_token_is_refused_without_echoing_it(
    tiny_llama: Path, setting: str, value: str
) -> None:
    command = [sys.executable, "-m", "service", "serve", "--model", str(tiny_llama)]
    env = {**os.environ, setting: value}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert f"{setting}: every token must be at least 8 characters long" in done.stderr
    for fragment in (SHORT_TOKEN, SHORT_TOKEN[:3], "long-enough-token"):
        assert fragment not in done.stderr + done.stdout
