"""Hot swap end to end (issue 10, Acceptance): real `crs-service serve` processes, tiny Hugging
Face reward models of different seeds as the versions, a real redis-server, and a direct per-item
transformers forward (tests/models.py ``DirectScorer``) as the reference for every value.

Every reward a response carries is compared with the direct score of the model of the version
that response names: two seeds differ far more than the tolerance, so a batch run partly on the
other version, or a response mixing versions, would show as a reward of the wrong model.

The processes start together once per module (they share two CPU cores, and start-up is most of
the cost). The swap server is shared by several tests, each of which loads a model that is not
the active one at the time, so that they hold in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.models import DirectScorer, sentence
from trainer_client import RewardClient, RewardResult
from trainer_client.launch import RedisProcess, ServiceProcess

TOLERANCE = 1e-4
K = 4  # stored baseline responses per prompt
ADMIN_TOKEN = "hot-swap-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEAN = {"aggregate": "mean", "normalize": "none"}
WAIT_S = 120.0  # how long a wait for a state may take before the test fails (slow CI machine)
# This module's own databases on the session's redis-server (other tests flush database 0).
SWAP_DB, NAMED_DB, FLEET_DB = 11, 12, 13


# --- data --------------------------------------------------------------------------------------


def prompts(tag: str, count: int) -> list[Any]:
    """``count`` prompts unique to ``tag`` (every other one a chat), so that each test's
    baselines are its own in a store the tests share."""
    return [
        f"[{tag}] question {n}: how is a reward computed?"
        if n % 2
        else [{"role": "user", "content": f"[{tag}] question {n}: explain the baseline"}]
        for n in range(count)
    ]


def baselines(tag: str, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` prompts of ``tag`` with K stored responses each, of varied lengths."""
    rng = random.Random(seed)
    return [
        {"prompt": prompt, "responses": [sentence(rng, 1, 12) for _ in range(K)]}
        for prompt in prompts(tag, count)
    ]


def queries(stored: Sequence[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` (prompt, response) items over the stored prompts, responses not stored."""
    rng = random.Random(seed)
    return [
        {"prompt": stored[n % len(stored)]["prompt"], "response": sentence(rng, 1, 16)}
        for n in range(count)
    ]


def pairs(stored: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": s["prompt"], "response": r} for s in stored for r in s["responses"]]


LOAD_BASELINES = baselines("load", 4, seed=1)
POOL = queries(LOAD_BASELINES, 64, seed=2)  # what the clients under load send, by index
EAGER_BASELINES = baselines("eager", 3, seed=3)
NAMED_BASELINES = baselines("named", 3, seed=4)
NAMED_QUERIES = queries(NAMED_BASELINES, 6, seed=5)
FLEET_BASELINES = baselines("fleet", 6, seed=6)
FLEET_POOL = queries(FLEET_BASELINES, 32, seed=8)  # what the clients of the rollout send
GOLDEN = queries(LOAD_BASELINES, 5, seed=7)


# --- models and their direct scores ------------------------------------------------------------


class Reference:
    """Direct transformers scores of each model directory, computed once per item."""

    def __init__(self) -> None:
        self._scorers: dict[Path, DirectScorer] = {}
        self._scores: dict[tuple[Path, str, str], float] = {}

    def reward(self, model: Path, prompt: Any, response: str) -> float:
        key = (model, json.dumps(prompt), response)
        if key not in self._scores:
            if model not in self._scorers:
                self._scorers[model] = DirectScorer(model)
            self._scores[key] = self._scorers[model].reward(prompt, response)
        return self._scores[key]

    def rewards(self, model: Path, items: Sequence[dict[str, Any]]) -> list[float]:
        return [self.reward(model, item["prompt"], item["response"]) for item in items]

    def baseline(self, model: Path, stored: dict[str, Any]) -> float:
        """The mean of the model's direct scores of a prompt's stored responses."""
        return float(np.mean(self.rewards(model, pairs([stored]))))


@dataclass(frozen=True)
class Models:
    """Three tiny llama reward models: same architecture and tokenizer, different weights."""

    a: Path
    b: Path
    c: Path
    reference: Reference = field(default_factory=Reference)

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.a, self.b, self.c)


@pytest.fixture(scope="module")
def models(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Models:
    from service.scoring.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("hot-swap-models")
    built = Models(
        a=tiny_llama,
        b=build_tiny_model(root / "seed-1", "llama", seed=1),
        c=build_tiny_model(root / "seed-2", "llama", seed=2),
    )
    # The test proves nothing unless the versions score the same items differently.
    scores = [built.reference.rewards(model, POOL[:8]) for model in built.all]
    for one, other in ((0, 1), (0, 2), (1, 2)):
        assert np.min(np.abs(np.subtract(scores[one], scores[other]))) > 100 * TOLERANCE
    return built


# --- the processes -----------------------------------------------------------------------------


def redis_db(server: RedisProcess, db: int) -> str:
    return server.url.rsplit("/", 1)[0] + f"/{db}"


@dataclass(frozen=True)
class Fleet:
    """swap: model A with the admin plane (tests of a swap under load, eager activation, failed
    loads); named: help=A and harm=B side by side; replicas: two of model A sharing one Redis
    database, for the `crs-service models` rollout."""

    swap: ServiceProcess
    named: ServiceProcess
    replicas: tuple[ServiceProcess, ServiceProcess]

    @property
    def all(self) -> tuple[ServiceProcess, ...]:
        return (self.swap, self.named, *self.replicas)


@pytest.fixture(scope="module")
def fleet(models: Models, redis_server: RedisProcess) -> Iterator[Fleet]:
    admin = {"CRS_ADMIN_TOKEN": ADMIN_TOKEN}

    def replica() -> ServiceProcess:
        return ServiceProcess(
            models.a, args=["--redis-url", redis_db(redis_server, FLEET_DB)], env=admin
        )

    servers = Fleet(
        swap=ServiceProcess(
            models.a, args=["--redis-url", redis_db(redis_server, SWAP_DB)], env=admin
        ),
        # ServiceProcess passes its model as `--model <model>`: a NAME=DIR is one as well.
        named=ServiceProcess(
            Path(f"help={models.a}"),
            args=["--model", f"harm={models.b}", "--redis-url", redis_db(redis_server, NAMED_DB)],
        ),
        replicas=(replica(), replica()),
    )
    with contextlib.ExitStack() as stack:
        # Started together, then waited for, then stopped together: the waits overlap.
        for server in servers.all:
            stack.enter_context(server)
        stack.callback(stop_together, servers.all)
        for server in servers.all:
            server.wait_ready()
        yield servers


def stop_together(servers: Sequence[ServiceProcess]) -> None:
    """SIGTERM to all, then wait for each (a graceful stop takes seconds of its own)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(ServiceProcess.stop, servers))


# --- HTTP helpers ------------------------------------------------------------------------------


def listing(server: ServiceProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/models", timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def entry(server: ServiceProcess, version: str) -> dict[str, Any] | None:
    return next((m for m in listing(server)["models"] if m["version"] == version), None)


def active(server: ServiceProcess) -> dict[str, Any]:
    """The default name's active entry."""
    body = listing(server)
    found = entry(server, body["active"]["version"])
    assert found is not None
    return found


def wait_until(condition: Callable[[], bool], what: str, server: ServiceProcess) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` (and the log) if it never does."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}:\n{server.log_tail()}")
        time.sleep(0.05)


def settled(server: ServiceProcess) -> None:
    """Wait until no version loads or drains (a previous test's swap is over)."""
    wait_until(
        lambda: all(m["state"] not in ("loading", "draining") for m in listing(server)["models"]),
        "every version to be loaded and drained",
        server,
    )


def other_model(server: ServiceProcess, models: Models) -> Path:
    """A model directory that the server does not serve now."""
    current = Path(active(server)["path"])
    return next(model for model in models.all if model != current)


def load(server: ServiceProcess, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/models", json=body, headers=ADMIN, timeout=60)


def push(server: ServiceProcess, stored: Sequence[dict[str, Any]], **extra: Any) -> None:
    body = {"items": list(stored), **extra}
    response = httpx.put(f"{server.url}/v1/baselines", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["stored"] == len(stored)


def score(server: ServiceProcess, items: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    body = {"items": list(items), "contrastive": MEAN, **extra}
    response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def of_prompt(stored: Sequence[dict[str, Any]], prompt: Any) -> dict[str, Any]:
    return next(s for s in stored if s["prompt"] == prompt)


# --- 1. a swap under steady load ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One answer a load client got: its HTTP status, the version it names (None unless 200),
    the pool indices it scored, and per item the reward, baseline and baseline source;
    ``sent`` and ``received`` (monotonic clock) bound when the server may have served it."""

    status: int
    version: str | None = None
    indices: tuple[int, ...] = ()
    rewards: tuple[float, ...] = ()
    baselines: tuple[float | None, ...] = ()
    sources: tuple[str | None, ...] = ()
    sent: float = 0.0
    received: float = 0.0


@dataclass(frozen=True)
class Sent:
    """One /v1/rewards request as it went: the version it pinned, and its answer's status
    and (when refused) the reason in the envelope's details."""

    status: int
    pin: str | None
    reason: str | None

    @classmethod
    def of(cls, *, request_body: dict[str, Any], response: httpx.Response) -> Sent:
        reason = None
        if response.status_code != 200:
            reason = ((response.json().get("error") or {}).get("details") or {}).get("reason")
        return cls(response.status_code, request_body.get("model_version"), reason)


class LoadClient(threading.Thread):
    """Sends requests of ``size`` items of ``pool`` in a loop until stopped, recording each
    answer; ``offset`` makes the clients' items differ."""

    def __init__(
        self,
        name: str,
        url: str,
        size: int,
        offset: int,
        stop: threading.Event,
        pool: Sequence[dict[str, Any]] = POOL,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.url, self.size, self.offset, self.stop = url, size, offset, stop
        self.pool = pool
        self.answers: list[Answer] = []
        self.sent: list[Sent] = []  # every /v1/rewards request, retries included
        self.error: BaseException | None = None

    def indices(self, n: int) -> tuple[int, ...]:
        start = (n * 7 + self.offset) % len(self.pool)
        return tuple((start + i) % len(self.pool) for i in range(self.size))

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                self.answers.append(self.send(self.indices(n)))
                n += 1
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def send(self, indices: tuple[int, ...]) -> Answer:
        raise NotImplementedError

    def versions(self) -> list[str | None]:
        return [answer.version for answer in self.answers]


class HttpxClient(LoadClient):
    """Plain httpx, one request per answer."""

    def run(self) -> None:
        with httpx.Client(timeout=60) as self.http:
            super().run()

    def send(self, indices: tuple[int, ...]) -> Answer:
        body = {"items": [self.pool[i] for i in indices], "contrastive": MEAN}
        sent = time.monotonic()
        response = self.http.post(f"{self.url}/v1/rewards", json=body)
        received = time.monotonic()
        self.sent.append(Sent.of(request_body=body, response=response))
        if response.status_code != 200:
            return Answer(status=response.status_code, sent=sent, received=received)
        answer = response.json()
        results = answer["results"]
        return Answer(
            status=200,
            version=answer["model"]["version"],
            indices=indices,
            rewards=tuple(r["reward"] for r in results),
            baselines=tuple(r["baseline"] for r in results),
            sources=tuple(r["baseline_source"] for r in results),
            sent=sent,
            received=received,
        )


class Recording(httpx.AsyncBaseTransport):
    """The network transport, recording every /v1/rewards request and its answer (what the
    client retries would not show in its results); ``between`` runs after the first answer
    is read, before the client gets it."""

    def __init__(self, sent: list[Sent], between: Callable[[], None] | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent, self.between = sent, between

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/v1/rewards":
            await response.aread()
            self.sent.append(Sent.of(request_body=json.loads(request.content), response=response))
            if self.between is not None:
                between, self.between = self.between, None
                between()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class ClientOfTrainers(LoadClient):
    """trainer_client.RewardClient; a call of 64 items goes as two chunks of 32, which the
    client keeps on one version."""

    def run(self) -> None:
        transport = Recording(self.sent)
        with RewardClient(self.url, chunk_size=32, transport=transport) as self.client:
            super().run()

    def send(self, indices: tuple[int, ...]) -> Answer:
        results: list[RewardResult] = self.client.score([self.pool[i] for i in indices], MEAN)
        versions = {r.model_version for r in results}
        assert len(versions) == 1, f"one call got several versions: {versions}"
        return Answer(
            status=200,
            version=versions.pop(),
            indices=indices,
            rewards=tuple(r.reward for r in results),
            baselines=tuple(r.baseline for r in results),
            sources=tuple(r.baseline_source for r in results),
        )


def answered_by(clients: Sequence[LoadClient], version: str, count: int) -> Callable[[], bool]:
    """Every client has ``count`` answers of ``version`` (or one of them failed)."""

    def check() -> bool:
        if any(c.error is not None or not c.is_alive() for c in clients):
            return True  # the test's assertions say what went wrong
        return all(c.versions().count(version) >= count for c in clients)

    return check


def test_a_swap_under_load_answers_every_request_with_one_whole_version(
    fleet: Fleet, models: Models
) -> None:
    server = fleet.swap
    settled(server)
    before = active(server)
    old, old_path = before["version"], Path(before["path"])
    new_path = other_model(server, models)
    push(server, LOAD_BASELINES)
    stop = threading.Event()
    clients: list[LoadClient] = [
        HttpxClient("httpx-1", server.url, 1, 0, stop),
        HttpxClient("httpx-64", server.url, 64, 16, stop),
        ClientOfTrainers("client-1", server.url, 1, 32, stop),
        ClientOfTrainers("client-64", server.url, 64, 48, stop),
    ]
    for client in clients:
        client.start()
    try:
        wait_until(answered_by(clients, old, 3), f"three answers of {old} each", server)
        accepted = load(server, {"path": str(new_path), "activate": True})
        assert accepted.status_code == 202, accepted.text
        new = accepted.json()["version"]
        assert new != old
        wait_until(lambda: listing(server)["active"]["version"] == new, f"{new} active", server)
        wait_until(answered_by(clients, new, 3), f"three answers of {new} each", server)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    paths = {old: old_path, new: new_path}
    for client in clients:
        assert client.error is None, f"{client.name}: {client.error!r}"
        assert_all_answered(client)
        assert_old_then_new(client, old, new)
        assert {sent.pin for sent in client.sent} <= {None, old, new}, client.sent
        for answer in client.answers:
            assert_scored_by(answer, paths[str(answer.version)], models.reference)
    # Each call of 64 goes as two chunks, the second (at least) pinned to one version.
    pinned = [sent for sent in clients[-1].sent if sent.pin is not None]
    assert len(pinned) >= len(clients[-1].answers), clients[-1].sent
    settled(server)
    assert [m["version"] for m in listing(server)["models"] if m["state"] != "failed"] == [new]


def assert_all_answered(client: LoadClient) -> None:
    """Every request got 200, the RewardClient's pinned chunks included: the old version
    lingers after its last request (CRS_DRAIN_IDLE_S), so the rest of a call pinned to it
    still finds it."""
    refused = [sent for sent in client.sent if sent.status != 200]
    assert not refused, f"{client.name}: {refused}"


def assert_old_then_new(client: LoadClient, old: str, new: str) -> None:
    """The client's versions are old...old new...new: one change, never back."""
    versions = client.versions()
    changes = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
    assert versions[0] == old, f"{client.name}: {versions}"
    assert versions[-1] == new, f"{client.name}: {versions}"
    assert len(changes) == 1, f"{client.name} changed version {len(changes)} times: {versions}"


def assert_scored_by(
    answer: Answer,
    model: Path,
    reference: Reference,
    pool: Sequence[dict[str, Any]] = POOL,
    stored: Sequence[dict[str, Any]] = LOAD_BASELINES,
) -> None:
    """Each reward is ``model``'s direct score of its item, each baseline the mean of its direct
    scores of the prompt's stored responses, from the cache: an answer mixing versions fails."""
    items = [pool[i] for i in answer.indices]
    where = f"answer of {answer.version} for pool items {answer.indices}"
    assert list(answer.rewards) == pytest.approx(reference.rewards(model, items), abs=TOLERANCE), (
        where
    )
    expected = [reference.baseline(model, of_prompt(stored, i["prompt"])) for i in items]
    assert list(answer.baselines) == pytest.approx(expected, abs=TOLERANCE), where
    assert set(answer.sources) == {"cache"}, where


@dataclass(frozen=True)
class AcrossASwap:
    """One RewardClient call of two chunks with a swap done between them."""

    results: list[RewardResult]
    sent: list[Sent]
    old: str
    new: str
    paths: dict[str, Path]


def score_across_a_swap(
    server: ServiceProcess, models: Models, *, until_unloaded: bool = True
) -> AcrossASwap:
    """The call's first chunk is answered by the old version, which is then replaced before
    the second chunk, pinned to it, is sent: what a trainer's call meets when a swap lands
    between its chunks. ``until_unloaded``: the second chunk waits until the old version is
    unloaded too (a pause between chunks longer than CRS_DRAIN_IDLE_S), else only until the
    new one is active."""
    settled(server)
    before = active(server)
    new_path = other_model(server, models)
    swapped: list[str] = []

    def swap() -> None:
        accepted = load(server, {"path": str(new_path), "activate": True})
        assert accepted.status_code == 202, accepted.text
        swapped.append(accepted.json()["version"])
        if not until_unloaded:
            wait_until(lambda: active(server)["version"] == swapped[0], "the swap", server)
            return
        wait_until(
            lambda: (
                [m["version"] for m in listing(server)["models"] if m["state"] != "failed"]
                == swapped
            ),
            f"{swapped[0]} alone loaded",
            server,
        )

    sent: list[Sent] = []
    with RewardClient(server.url, chunk_size=32, transport=Recording(sent, swap)) as client:
        results = client.score(POOL, None)
    assert swapped, "the swap never ran: the call went as one chunk"
    return AcrossASwap(
        results=results,
        sent=sent,
        old=before["version"],
        new=swapped[0],
        paths={before["version"]: Path(before["path"]), swapped[0]: new_path},
    )


def test_a_call_whose_version_left_between_its_chunks_is_scored_on_one_version(
    fleet: Fleet, models: Models
) -> None:
    call = score_across_a_swap(fleet.swap, models)
    # The case arose: the second chunk was pinned to the version the first one got.
    assert [sent.pin for sent in call.sent[:2]] == [None, call.old]
    versions = {result.model_version for result in call.results}
    assert len(versions) == 1, versions
    version = versions.pop()
    assert [r.reward for r in call.results] == pytest.approx(
        models.reference.rewards(call.paths[version], POOL), abs=TOLERANCE
    )


def test_a_chunk_pinned_to_a_version_just_swapped_out_is_served_not_refused(
    fleet: Fleet, models: Models
) -> None:
    """The old version lingers (CRS_DRAIN_IDLE_S) after its last request, so the rest of a
    call pinned to it is served by it, with 200, and the call is of the old version."""
    call = score_across_a_swap(fleet.swap, models, until_unloaded=False)
    assert [(sent.status, sent.reason) for sent in call.sent] == [(200, None)] * len(call.sent)
    assert {result.model_version for result in call.results} == {call.old}
    assert [r.reward for r in call.results] == pytest.approx(
        models.reference.rewards(call.paths[call.old], POOL), abs=TOLERANCE
    )


# --- 2. eager activation -----------------------------------------------------------------------


def test_after_an_eager_activation_the_first_request_gets_the_new_baselines_from_the_cache(
    fleet: Fleet, models: Models
) -> None:
    server = fleet.swap
    settled(server)
    new_path = other_model(server, models)
    # Pushed now, scored by the version active now: the new one has no rewards of them cached.
    push(server, EAGER_BASELINES)
    accepted = load(server, {"path": str(new_path)})
    assert accepted.status_code == 202, accepted.text
    new = accepted.json()["version"]
    wait_until(lambda: (entry(server, new) or {}).get("state") == "ready", f"{new} ready", server)
    activated = httpx.post(f"{server.url}/admin/models/{new}/activate", headers=ADMIN, timeout=120)
    assert activated.status_code == 200, activated.text
    assert activated.json()["changed"] is True

    items = [{"prompt": s["prompt"], "response": "a first answer"} for s in EAGER_BASELINES]
    answer = score(server, items)
    assert answer["model"]["version"] == new
    results = answer["results"]
    assert [r["baseline_source"] for r in results] == ["cache"] * len(items)
    expected = [models.reference.baseline(new_path, s) for s in EAGER_BASELINES]
    assert [r["baseline"] for r in results] == pytest.approx(expected, abs=TOLERANCE)
    assert [r["reward"] for r in results] == pytest.approx(
        models.reference.rewards(new_path, items), abs=TOLERANCE
    )
    progress = (entry(server, new) or {})["rebaseline"]
    assert progress is not None, f"{new} was activated without an eager rebaseline"
    assert progress["state"] == "done"
    assert progress["responses_scored"] >= len(EAGER_BASELINES) * K
    settled(server)


# --- 3. two named models -----------------------------------------------------------------------


def test_two_named_models_each_score_with_their_own_weights_and_baselines(
    fleet: Fleet, models: Models
) -> None:
    server = fleet.named
    body = listing(server)
    assert body["default"] == "help"
    assert set(body["active_versions"]) == {"help", "harm"}
    assert all(body["active_versions"].values())
    assert sorted((m["name"], m["state"]) for m in body["models"]) == [
        ("harm", "active"),
        ("help", "active"),
    ]
    # The same prompts and responses for both: only the model differs.
    push(server, NAMED_BASELINES, model="help")
    push(server, NAMED_BASELINES, model="harm")
    for name, path in (("help", models.a), ("harm", models.b), (None, models.a)):
        extra = {"model": name} if name else {}
        answer = score(server, NAMED_QUERIES, **extra)
        served = name or "help"
        assert answer["model"]["name"] == served
        assert answer["model"]["version"] == body["active_versions"][served]
        results = answer["results"]
        assert [r["reward"] for r in results] == pytest.approx(
            models.reference.rewards(path, NAMED_QUERIES), abs=TOLERANCE
        ), name
        expected = [
            models.reference.baseline(path, of_prompt(NAMED_BASELINES, q["prompt"]))
            for q in NAMED_QUERIES
        ]
        assert [r["baseline"] for r in results] == pytest.approx(expected, abs=TOLERANCE), name
        assert {r["baseline_source"] for r in results} == {"cache"}
    unknown = httpx.post(
        f"{server.url}/v1/rewards", json={"items": NAMED_QUERIES[:1], "model": "nope"}
    )
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["details"]["models"] == ["help", "harm"]


# --- 4. `crs-service models` over two replicas -------------------------------------------------


def models_command(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", "models", *args]
    env = {**os.environ, "CRS_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def rebaselined(server: ServiceProcess) -> dict[str, float]:
    """``crs_rebaseline_prompts_total`` of ``server`` by outcome (a counter: compare deltas)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "crs_rebaseline_prompts_total"
    }


def delta(after: dict[str, float], before: dict[str, float], outcome: str) -> float:
    return after.get(outcome, 0.0) - before.get(outcome, 0.0)


def rollout_clients(
    replicas: Sequence[ServiceProcess], stop: threading.Event
) -> dict[str, list[LoadClient]]:
    """Three plain httpx clients per replica (1, 4 and 16 items a request), each sending
    contrastive requests over the fleet's stored prompts to its replica directly."""
    return {
        replica.url: [
            HttpxClient(f"{name}-{size}", replica.url, size, offset, stop, pool=FLEET_POOL)
            for size, offset in ((1, 0), (4, 8), (16, 16))
        ]
        for name, replica in zip(("first", "second"), replicas, strict=True)
    }


def assert_switched_once(clients: Sequence[LoadClient], old: str, new: str) -> None:
    """The replica's answers go old...old new...new: each client's do, and no request sent
    after one of the replica's new answers came back got the old version."""
    for client in clients:
        assert_old_then_new(client, old, new)
    answers = [answer for client in clients for answer in client.answers]
    last_old_sent = max(a.sent for a in answers if a.version == old)
    first_new_received = min(a.received for a in answers if a.version == new)
    assert last_old_sent < first_new_received, f"{clients[0].url} went back to {old}"


def test_models_load_rolls_two_replicas_onto_the_new_version_and_the_second_reuses_the_first(
    fleet: Fleet, models: Models
) -> None:
    """`crs-service models load --activate --rebaseline eager` over two replicas sharing one
    Redis, while clients score contrastive rewards on both: every request answered 200 by one
    whole version, each replica switching once, the first before the second, and the second's
    rebaseline finding every stored prompt rescored by the first."""
    first, second = fleet.replicas
    push(first, FLEET_BASELINES)
    stored = httpx.get(f"{second.url}/v1/baselines", timeout=30).json()["prompts"]
    assert stored == len(FLEET_BASELINES)
    old, old_path = active(first)["version"], Path(active(first)["path"])
    assert active(second)["version"] == old
    metrics_before = [rebaselined(replica) for replica in fleet.replicas]
    urls = [first.url, second.url]
    stop = threading.Event()
    clients = rollout_clients(fleet.replicas, stop)
    everyone = [client for group in clients.values() for client in group]
    for client in everyone:
        client.start()
    try:
        wait_until(answered_by(everyone, old, 3), f"three answers of {old} each", first)
        began = time.monotonic()
        done = models_command(
            "load", *urls, "--path", str(models.b), "--activate", "--rebaseline", "eager", "--quiet"
        )
        ended = time.monotonic()
        assert done.returncode == 0, done.stderr + first.log_tail() + second.log_tail()
        new = active(first)["version"]
        wait_until(answered_by(everyone, new, 3), f"three answers of {new} each", second)
    finally:
        stop.set()
        for client in everyone:
            client.join(timeout=120)

    assert new.startswith(f"{models.a.name}@")
    assert new != old
    assert Path(active(first)["path"]) == models.b
    assert active(second)["version"] == new
    assert all(new in line for line in done.stdout.splitlines()), done.stdout
    # The load: zero non-2xx, each answer wholly of the version it names, on each replica.
    paths = {old: old_path, new: models.b}
    for client in everyone:
        assert client.error is None, f"{client.name}: {client.error!r}"
        assert_all_answered(client)
        for answer in client.answers:
            assert_scored_by(
                answer, paths[str(answer.version)], models.reference, FLEET_POOL, FLEET_BASELINES
            )
    for replica in fleet.replicas:
        during = [
            answer
            for client in clients[replica.url]
            for answer in client.answers
            if answer.sent >= began and answer.received <= ended
        ]
        assert len(during) >= 10, f"{replica.url}: only {len(during)} requests during the rollout"
        assert_switched_once(clients[replica.url], old, new)
    # One replica after the other: the second switched only after the first had.
    first_old = [a.sent for c in clients[first.url] for a in c.answers if a.version == old]
    second_new = [a.received for c in clients[second.url] for a in c.answers if a.version == new]
    assert max(first_old) < min(second_new)
    assert active(first)["activated_at"] < active(second)["activated_at"]

    # The first replica scored every stored response with the new version, the second none.
    scored, reused = active(first)["rebaseline"], active(second)["rebaseline"]
    assert scored is not None, "the first replica activated without an eager rebaseline"
    assert reused is not None, "the second replica activated without an eager rebaseline"
    assert (scored["state"], reused["state"]) == ("done", "done")
    assert (scored["prompts_total"], scored["responses_scored"]) == (stored, stored * K)
    assert scored["prompts_cached_already"] == 0
    assert (reused["prompts_total"], reused["prompts_cached_already"]) == (stored, stored)
    assert (reused["responses_scored"], reused["prompts_failed"]) == (0, 0)
    metrics_after = [rebaselined(replica) for replica in fleet.replicas]
    assert delta(metrics_after[0], metrics_before[0], "scored") == stored
    assert delta(metrics_after[1], metrics_before[1], "scored") == 0
    assert delta(metrics_after[1], metrics_before[1], "cached_already") == stored
    # Both serve it, with the baselines the first one cached.
    items = [{"prompt": s["prompt"], "response": "fleet answer"} for s in FLEET_BASELINES]
    expected = [models.reference.baseline(models.b, s) for s in FLEET_BASELINES]
    for replica in fleet.replicas:
        results = score(replica, items)["results"]
        assert [r["baseline"] for r in results] == pytest.approx(expected, abs=TOLERANCE)
        assert {r["baseline_source"] for r in results} == {"cache"}

    shown = models_command("list", *urls)
    assert shown.returncode == 0, shown.stderr
    for url in urls:
        assert url in shown.stdout
    rows = [line.split() for line in shown.stdout.splitlines() if new in line]
    assert [row[row.index(new) + 1] for row in rows] == ["active", "active"], shown.stdout
    as_json = json.loads(models_command("list", *urls, "--json").stdout)["replicas"]
    assert [r["url"] for r in as_json] == urls
    assert [r["models"]["active_versions"] for r in as_json] == [{models.a.name: new}] * 2


# --- 5. failed loads ---------------------------------------------------------------------------


def two_label_model(model: Path, out: Path) -> Path:
    """``model`` with a config of two labels (the weights are never reached)."""
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    config["label2id"] = {"bad": 0, "good": 1}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("not a model", "no config.json"),
        ("two labels", "num_labels=2"),
    ],
)
def test_a_directory_that_cannot_be_a_model_is_refused_with_422(
    fleet: Fleet, models: Models, tmp_path: Path, setup: str, message: str
) -> None:
    server = fleet.swap
    settled(server)
    before = active(server)["version"]
    directory = tmp_path / "model"
    if setup == "not a model":
        directory.mkdir()
        (directory / "README.md").write_text("notes, not weights\n")
    elif setup == "two labels":
        two_label_model(models.a, directory)
    refused = load(server, {"path": str(directory), "activate": True})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["type"] == "invalid_model"
    assert message in error["message"]
    assert listing(server)["active"]["version"] == before
    assert all(m["path"] != str(directory) for m in listing(server)["models"])


def test_a_golden_mismatch_fails_the_load_and_the_active_version_serves_on(
    fleet: Fleet, models: Models, tmp_path: Path
) -> None:
    server = fleet.swap
    settled(server)
    before = active(server)
    candidate = other_model(server, models)
    golden = tmp_path / "golden.jsonl"
    expected = models.reference.rewards(candidate, GOLDEN)
    expected[2] += 0.5  # one item off: the others are the candidate's true scores
    lines = [{**item, "reward": reward} for item, reward in zip(GOLDEN, expected, strict=True)]
    golden.write_text("".join(json.dumps(line) + "\n" for line in lines))

    accepted = load(server, {"path": str(candidate), "activate": True, "golden": str(golden)})
    assert accepted.status_code == 202, accepted.text
    version = accepted.json()["version"]
    wait_until(
        lambda: (entry(server, version) or {}).get("state") == "failed", f"{version} failed", server
    )
    failed = entry(server, version)
    assert failed is not None
    assert failed["error"].startswith("golden mismatch: 1 of 5 items"), failed["error"]
    assert "item 2 " in failed["error"]
    assert listing(server)["active"]["version"] == before["version"]
    answer = score(server, GOLDEN, contrastive=None)
    assert answer["model"]["version"] == before["version"]
    assert [r["reward"] for r in answer["results"]] == pytest.approx(
        models.reference.rewards(Path(before["path"]), GOLDEN), abs=TOLERANCE
    )
