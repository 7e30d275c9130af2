"""`crs-trainer push-baselines --mode append` interrupted and run again, as its message says,
against a real `crs-service serve` on a real `redis-server`: every prompt's responses are
stored exactly once. The interruption is a request that lands but whose answer is lost (a
fault proxy answers 503 after forwarding it) with no retry left, so the run stops there."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fault_proxy import FaultProxy
from trainer_client.cli import main
from trainer_client.launch import RedisProcess, ServiceProcess

PROMPTS = 12
CHUNK = 4  # three requests
LINES: list[dict[str, Any]] = [
    {
        "prompt_id": f"append-once/{n}",
        "prompt": f"Question number {n}?",
        "responses": [f"answer {n}.{j}" for j in range(1 + n % 3)],
    }
    for n in range(PROMPTS)
]


@pytest.fixture(scope="module")
def server(tiny_llama: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_llama, args=["--redis-url", redis_server.url]) as process:
        process.wait_ready()
        yield process


@pytest.fixture
def proxy(server: ServiceProcess) -> Iterator[FaultProxy]:
    with FaultProxy(server.url) as running:
        yield running


def stored_responses(url: str, pid: str) -> list[str]:
    answer = httpx.get(f"{url}/v1/baselines/{pid}", timeout=30)
    assert answer.status_code == 200, answer.text
    responses: list[str] = answer.json()["responses"]
    return responses


def push(path: Path, url: str, *extra: str) -> int:
    args = ["push-baselines", str(path), "--url", url, "--mode", "append"]
    return main([*args, "--chunk-prompts", str(CHUNK), "--quiet", *extra])


def test_an_interrupted_append_run_again_stores_each_prompt_once(
    server: ServiceProcess,
    proxy: FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "baselines.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES), encoding="utf-8")

    # The first request is stored, but its answer is lost and no retry is left: the run stops.
    proxy.inject(503, forward_first=True)
    first_ok = push(path, proxy.url, "--retries", "0")
    first = capsys.readouterr()

    assert first_ok == 1
    assert [seen.status for seen in proxy.paths("/v1/baselines")] == [503]

    # Run again, as the message says (now with retries, straight to the service).
    second_ok = push(path, server.url)
    second = capsys.readouterr()

    assert second_ok == 0, second.err
    stored = [stored_responses(server.url, line["prompt_id"]) for line in LINES]
    assert stored == [line["responses"] for line in LINES]
    assert "re-run the same command" in first.err
    assert f"stored {PROMPTS} prompts ({CHUNK} applied by an earlier upload), failed 0" in (
        second.out
    )
