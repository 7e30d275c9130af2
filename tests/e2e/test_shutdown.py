"""SIGTERM on a real `crs-service`: `/readyz` 503 through the drain, a 503 envelope for what
outlasts it, exit code 0."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.models import mixed_items
from trainer_client.launch import ServiceProcess

# One forward thread and thousands of long items: this request takes far longer than the
# drains below, on any machine, so the cut-off is certain rather than timed.
SLOW = {"CRS_DEVICE_WORKERS": "1", "CRS_MAX_QUEUE_TOKENS": "16777216"}
SHUTTING_DOWN = "the service is shutting down; retry on another replica"


def in_flight(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    match = re.search(r"^crs_requests_in_flight (\S+)$", metrics, re.MULTILINE)
    assert match, "crs_requests_in_flight is missing from /metrics"
    return float(match.group(1))


class BigRequest:
    """A long `/v1/rewards` request sent from a thread, started once it is inside the app."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.items = mixed_items(4096, seed=5, max_words=150)
        self.response: httpx.Response | None = None
        self.thread = threading.Thread(target=self.send)

    def send(self) -> None:
        body = {"items": self.items}
        self.response = httpx.post(f"{self.url}/v1/rewards", json=body, timeout=300)

    def start(self) -> BigRequest:
        self.thread.start()
        # /metrics counts itself: more than one request in flight means ours is inside.
        deadline = time.monotonic() + 60
        while in_flight(self.url) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.thread.is_alive(), "the request finished before SIGTERM: nothing to prove"
        return self

    def result(self) -> httpx.Response:
        self.thread.join(timeout=300)
        assert self.response is not None
        return self.response


@pytest.fixture
def server_factory(tiny_llama: Path) -> Iterator[Any]:
    started: list[ServiceProcess] = []

    def start(env: dict[str, str]) -> ServiceProcess:
        server = ServiceProcess(tiny_llama, env={**SLOW, **env}).start()
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def assert_shutting_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"]
    assert response.json() == {
        "error": {"type": "not_ready", "message": SHUTTING_DOWN, "details": None}
    }


def exit_code(server: ServiceProcess) -> int:
    assert server.process is not None
    return server.process.wait(timeout=60)


def test_request_outlasting_the_drain_gets_a_503_envelope_and_the_process_exits_0(
    server_factory: Any,
) -> None:
    server = server_factory({"CRS_SHUTDOWN_TIMEOUT_S": "0.5"})
    big = BigRequest(server.url).start()
    server.signal()
    assert_shutting_down(big.result())
    assert exit_code(server) == 0
    assert "answering 1 requests still in flight with 503" in server.log_path.read_text()


def test_readyz_answers_503_through_the_drain_and_a_second_signal_ends_it(
    server_factory: Any,
) -> None:
    server = server_factory({"CRS_SHUTDOWN_TIMEOUT_S": "600"})
    big = BigRequest(server.url).start()
    server.signal()
    # The drain cannot end while the big request runs (600 s): the listener still answers.
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["error"] == {"type": "not_ready", "message": "draining", "details": None}
    alive = httpx.get(f"{server.url}/livez")
    assert alive.status_code == 200
    # Requests are still served during the drain, and told to reconnect (elsewhere).
    assert alive.headers["connection"] == "close"
    assert big.thread.is_alive()
    server.signal()
    assert_shutting_down(big.result())
    assert exit_code(server) == 0


def test_idle_server_stops_at_once_with_exit_code_0(server_factory: Any) -> None:
    server = server_factory({})
    server.signal()
    assert exit_code(server) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/livez")
