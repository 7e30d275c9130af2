"""The shared batcher behind a real server: backpressure, time limits, disconnects."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.models import mixed_items
from trainer_client.launch import ServiceProcess


def metric(url: str, name: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_flood_beyond_the_queue_bound_gets_quick_429s_and_admitted_work_completes(
    tiny_llama: Path,
) -> None:
    env = {"CRS_MAX_QUEUE_TOKENS": "6000", "CRS_MAX_BATCH_TOKENS": "4096"}
    requests = [{"items": mixed_items(8, seed=s, max_words=80)} for s in range(48)]
    with ServiceProcess(tiny_llama, env=env) as server:
        server.wait_ready()

        async def flood() -> list[tuple[int, float, httpx.Response]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

                async def send(body: dict[str, Any]) -> tuple[int, float, httpx.Response]:
                    response = await client.post("/v1/rewards", json=body)
                    return response.status_code, time.monotonic(), response

                return await asyncio.gather(*(send(body) for body in requests))

        answers = asyncio.run(flood())
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 429}, statuses
    refused = [(at, r) for status, at, r in answers if status == 429]
    admitted = [(at, r) for status, at, r in answers if status == 200]
    for _, response in refused:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "overloaded"
    sizes = [len(body["items"]) for body, status in zip(requests, statuses, strict=True)]
    for (_, response), size in zip(
        admitted, [n for n, s in zip(sizes, statuses, strict=True) if s == 200], strict=True
    ):
        assert len(response.json()["results"]) == size
    # Refusals are answered at once, not after waiting in line behind the admitted work.
    assert min(at for at, _ in refused) < max(at for at, _ in admitted)


def test_requests_past_the_time_limit_get_504(tiny_llama: Path) -> None:
    with ServiceProcess(tiny_llama, env={"CRS_REQUEST_TIMEOUT_S": "0.001"}) as server:
        server.wait_ready()
        body = {"items": mixed_items(256, seed=1)}
        response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout"
        assert metric(server.url, 'crs_items_dropped_total{reason="timeout"}') > 0
        assert httpx.get(f"{server.url}/readyz").status_code == 200


def post_and_give_up(url: str, body: dict[str, Any]) -> None:
    """A client that stops waiting after half a second, as trainers' timeouts do."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/rewards", json=body, timeout=httpx.Timeout(30, read=0.5))


def test_a_disconnected_clients_items_are_not_scored(tiny_llama: Path) -> None:
    big = mixed_items(1024, seed=5, max_words=150)
    # Longer than any item of the big request: it waits until the big one is done.
    lonely = {"items": [{"prompt": "why " * 250, "response": "because " * 230}]}
    outcome: dict[str, int] = {}
    with ServiceProcess(tiny_llama) as server:
        server.wait_ready()
        scored_before = metric(server.url, "crs_batch_items_sum")  # the warm-up batch

        def send_big() -> None:
            response = httpx.post(f"{server.url}/v1/rewards", json={"items": big}, timeout=300)
            outcome["status"] = response.status_code

        sender = threading.Thread(target=send_big)
        sender.start()
        deadline = time.monotonic() + 60
        while metric(server.url, "crs_queue_items") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        post_and_give_up(server.url, lonely)
        sender.join(timeout=300)
        assert not sender.is_alive()
        deadline = time.monotonic() + 10
        while metric(server.url, 'crs_items_dropped_total{reason="cancelled"}') < 1:
            assert time.monotonic() < deadline, "the disconnected item was never dropped"
            time.sleep(0.01)
        scored = metric(server.url, "crs_batch_items_sum") - scored_before
    assert outcome["status"] == 200
    assert scored == len(big)
