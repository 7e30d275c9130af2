"""The trainer's reward fetcher: an AsyncRewardClient on an event loop thread of its own.

Over real HTTP against a small stand-in server (the standard library's, so that this file runs
in the torch- and FastAPI-free Python 3.12 venv as well: `make pytest312`). The server holds
each answer until the test releases it, so "the fetch runs while the trainer works" is shown
by order of events, not by timing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from trainer_client import RewardServiceError
from trainer_client.launch import free_port
from trainer_client.ppo.config import TrainConfig
from trainer_client.ppo.rewards import RewardFetcher

VERSION = "rm@abc123"


@dataclass
class StandIn:
    """What the stand-in server saw, and the gate its reward answers wait on."""

    release: threading.Event = field(default_factory=threading.Event)
    received: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    bodies: list[dict[str, Any]] = field(default_factory=list)


def handler_for(state: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output clean
            return None

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            model = {"name": "rm", "version": VERSION, "state": "active"}
            self._answer({"active": VERSION, "default": "rm", "models": [model]})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.bodies.append(body)
            state.received.set()
            state.release.wait(timeout=30)
            results = [
                {
                    "reward": float(len(item["response"])),
                    "baseline": 1.0,
                    "contrastive": float(len(item["response"])) - 1.0,
                    "baseline_n": 3,
                    "baseline_source": "cache",
                    "tokens": 4,
                    "truncated": False,
                }
                for item in body["items"]
            ]
            self._answer({"model": {"name": "rm", "version": VERSION}, "results": results})
            state.answered.set()

        def _answer(self, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


@pytest.fixture
def stand_in() -> Iterator[tuple[str, StandIn]]:
    state = StandIn()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler_for(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    state.release.set()
    server.shutdown()
    server.server_close()


def config(url: str, **fields: Any) -> TrainConfig:
    paths = {"policy": Path("policy"), "prompts": Path("prompts.jsonl"), "out": Path("out")}
    return TrainConfig(**paths, urls=(url,), **fields)


def test_a_fetch_runs_while_the_caller_works_and_answers_in_order(
    stand_in: tuple[str, StandIn],
) -> None:
    url, state = stand_in
    items = [{"prompt": "p", "response": "x" * n, "prompt_id": f"id{n}"} for n in range(5)]
    with RewardFetcher(config(url)) as fetcher:
        pending = fetcher.start(items)
        # start() returned before the server answered (it holds the answer until released):
        # the trainer's own work (the old and reference logprobs) happens here.
        assert not state.answered.is_set()
        assert state.received.wait(timeout=10)
        state.release.set()
        fetched = pending.wait()
    assert [r.reward for r in fetched.results] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert {r.model_version for r in fetched.results} == {VERSION}
    assert fetched.fetch_s >= 0
    sent = state.bodies[0]
    assert [item["prompt_id"] for item in sent["items"]] == [f"id{n}" for n in range(5)]
    # A contrastive run asks for the mean baseline and refuses a missing one by default.
    assert sent["contrastive"]["aggregate"] == "mean"
    assert sent["contrastive"]["on_missing"] == "error"


def test_a_raw_run_still_asks_for_baselines_but_never_refuses_without_one(
    stand_in: tuple[str, StandIn],
) -> None:
    url, state = stand_in
    state.release.set()
    with RewardFetcher(config(url, reward="raw")) as fetcher:
        fetcher.start([{"prompt": "p", "response": "r"}]).wait()
    assert state.bodies[0]["contrastive"]["on_missing"] == "null"


def test_close_stops_the_loop_thread_and_refuses_later_fetches(
    stand_in: tuple[str, StandIn],
) -> None:
    url, state = stand_in
    state.release.set()
    before = {t.name for t in threading.enumerate()}
    fetcher = RewardFetcher(config(url))
    assert "crs-ppo-rewards" in {t.name for t in threading.enumerate()} - before
    fetcher.close()
    fetcher.close()  # twice is harmless
    assert "crs-ppo-rewards" not in {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="closed"):
        fetcher.start([{"prompt": "p", "response": "r"}])


def test_an_unreachable_service_fails_the_preflight_naming_its_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with RewardFetcher(config(url)) as fetcher, pytest.raises(RewardServiceError) as refused:
        fetcher.check_reachable()
    assert url in str(refused.value) or refused.value.url == url


@pytest.mark.timeout(60)
def test_a_wait_whose_loop_thread_stopped_fails_instead_of_hanging(
    stand_in: tuple[str, StandIn],
) -> None:
    url, state = stand_in  # the server holds its answer: the fetch stays in flight
    fetcher = RewardFetcher(config(url))
    pending = fetcher.start([{"prompt": "p", "response": "r"}])
    assert state.received.wait(timeout=10)
    # What a loop thread gone for any reason looks like to the trainer waiting on it.
    fetcher._loop.call_soon_threadsafe(fetcher._loop.stop)
    fetcher._thread.join(timeout=10)
    with pytest.raises(RewardServiceError, match="loop stopped with a request in flight"):
        pending.wait()
