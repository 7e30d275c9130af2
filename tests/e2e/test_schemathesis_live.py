"""Schemathesis against a real `crs-service serve` process with auth on: every operation, with
and without the token, answers only what its OpenAPI document says (status, content type, body
schema, headers), and never a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import given, settings

from service.api.openapi import OPERATION_ERRORS
from service.api.schemas import PROMPT_ID_MAX_CHARS
from tests.contract import CHECKS, bounded
from trainer_client.launch import RedisProcess, ServiceProcess

TOKEN = "schemathesis-live-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_TOKEN = "schemathesis-live-admin-token"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Bounded: the whole module stays around a minute on two cores with the tiny model.
LIVE = bounded(20)
GUARDED = sorted(label for label, statuses in OPERATION_ERRORS.items() if 401 in statuses)
# Negative cases (schema-violating inputs) exist only where there are inputs: a body or a path.
CASES = [(label, schemathesis.GenerationMode.POSITIVE) for label in sorted(OPERATION_ERRORS)] + [
    (label, schemathesis.GenerationMode.NEGATIVE)
    for label in sorted(OPERATION_ERRORS)
    if "{" in label or 415 in OPERATION_ERRORS[label]
]


@pytest.fixture(scope="module")
def server(tiny_llama: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    # Small limits, so that 413 is reachable by generated bodies too.
    # The admin plane on: generated loads of made-up directories must be refused, not crash.
    env = {
        "CRS_API_TOKENS": TOKEN,
        "CRS_ADMIN_TOKEN": ADMIN_TOKEN,
        "CRS_MAX_ITEMS_PER_REQUEST": "16",
    }
    args = ["--redis-url", redis_server.url]
    with ServiceProcess(tiny_llama, args=args, env=env) as process:
        process.wait_ready()
        yield process


@pytest.fixture(scope="module")
def live_schema(server: ServiceProcess) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def check_operation(
    schema: Any, label: str, mode: schemathesis.GenerationMode, headers: dict[str, str]
) -> None:
    method, path = label.split(" ", 1)
    operation = schema[path][method]

    @LIVE
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_as_documented(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)

    answers_as_documented()


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_every_operation_answers_as_documented(
    live_schema: Any, label: str, mode: schemathesis.GenerationMode
) -> None:
    check_operation(live_schema, label, mode, ADMIN_AUTH if " /admin/" in label else AUTH)


@pytest.mark.parametrize("label", GUARDED)
def test_without_the_token_every_guarded_operation_answers_a_documented_401(
    live_schema: Any, label: str
) -> None:
    method, path = label.split(" ", 1)
    operation = live_schema[path][method]

    @settings(LIVE, max_examples=5)
    @given(case=operation.as_strategy())
    def refused(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        assert response.status_code == 401, response.text

    refused()


@pytest.mark.parametrize(
    "given",
    ["\U0001f600" * PROMPT_ID_MAX_CHARS, "a/b?c#d%e" + "/" * 20, "x" * PROMPT_ID_MAX_CHARS],
    ids=["longest-4-byte", "url-characters", "longest-ascii"],
)
def test_the_longest_prompt_ids_round_trip_over_http(server: ServiceProcess, given: str) -> None:
    # The request line of the longest id, percent-encoded UTF-8, fits the server's header limit.
    item = {"prompt": "P", "prompt_id": given, "responses": ["a"]}
    put = httpx.put(f"{server.url}/v1/baselines", json={"items": [item]}, headers=AUTH)
    assert put.status_code == 200, put.text
    url = f"{server.url}/v1/baselines/{quote(given, safe='')}"
    record = httpx.get(url, headers=AUTH)
    assert record.status_code == 200, record.text
    assert record.json()["prompt_id"] == given
    assert httpx.delete(url, headers=AUTH).json() == {"prompt_id": given, "deleted": True}
