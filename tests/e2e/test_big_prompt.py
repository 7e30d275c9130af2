"""A 20 MB prompt against a real crs-service process: a 4xx envelope (or, under left
truncation, a truncated reward), bounded memory, and small requests answered meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainer_client.launch import ServiceProcess

PROMPT_BYTES = 20 * 1024 * 1024
# The bound on the server's memory high-water growth for one such prompt (it was 6.7 GB for
# 30 MB when the whole prompt was tokenised).
MAX_GROWTH_BYTES = 400 * 1024 * 1024
SMALL = {"items": [{"prompt": "How are you?", "response": "Fine."}], "contrastive": None}


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of a process, in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


@pytest.fixture
def server(tiny_llama: Path) -> Iterator[ServiceProcess]:
    # A process per test: the memory high-water mark of one big request must not hide another's.
    with ServiceProcess(tiny_llama) as process:
        process.wait_ready()
        for _ in range(3):  # warm: the first requests allocate what every request reuses
            httpx.post(f"{process.url}/v1/rewards", json=SMALL, timeout=60).raise_for_status()
        yield process


def big_body(truncation: str) -> bytes:
    words = "lorem ipsum " * (PROMPT_BYTES // 12)
    body = {"items": [{"prompt": words, "response": "ok"}], "contrastive": None}
    return httpx.Request("POST", "/", json={**body, "truncation": truncation}).read()


def send_big_with_small_beside(server: ServiceProcess, body: bytes) -> tuple[Any, list[int]]:
    """The big request, and the statuses of small requests sent while it was in flight."""
    answer: dict[str, httpx.Response] = {}

    def send_big() -> None:
        headers = {"Content-Type": "application/json"}
        answer["big"] = httpx.post(
            f"{server.url}/v1/rewards", content=body, headers=headers, timeout=300
        )

    sender = threading.Thread(target=send_big)
    sender.start()
    small: list[int] = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        while sender.is_alive() or not small:
            small.append(client.post("/v1/rewards", json=SMALL).status_code)
    sender.join()
    return answer["big"], small


@pytest.mark.parametrize("truncation", ["none", "left"])
def test_a_20_mb_prompt_costs_little_and_stalls_nobody(
    server: ServiceProcess, truncation: str
) -> None:
    assert server.process is not None
    pid = server.process.pid
    body = big_body(truncation)
    assert len(body) < 32 * 1024 * 1024  # under the default body limit: it reaches the model
    before = memory_kib(pid, "VmHWM")
    big, small = send_big_with_small_beside(server, body)
    growth = (memory_kib(pid, "VmHWM") - before) * 1024
    if truncation == "none":
        assert big.status_code == 422, big.text[:500]
        error = big.json()["error"]
        assert error["type"] == "validation_error"
        [item] = error["details"]["items"]
        assert item["index"] == 0
        assert item["characters"] > error["details"]["max_characters"]
    else:
        assert big.status_code == 200, big.text[:500]
        [result] = big.json()["results"]
        assert result["truncated"]
    assert growth < MAX_GROWTH_BYTES, f"memory high-water grew by {growth / 2**20:.0f} MiB"
    assert set(small) == {200}  # at least one, sent while the big one was in flight
