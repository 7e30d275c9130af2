"""One ``score`` call, one model version; across calls, no going back (spec "Client").

The replicas are fakes behind ``httpx.MockTransport``, driven through ``RewardClient`` (and so
through ``AsyncRewardClient``, which does the work): this tests the client's side of the
protocol (which requests it sends, pinned to what, and what it makes of 409
``version_not_loaded``), so each replica only needs to answer for the versions it has loaded.
The real service's pinning is tested with the service; the client against real processes in
tests/e2e/test_client.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from trainer_client.client.retry import RetryPolicy
from trainer_client.client.reward_client import RewardClient, RewardServiceError, _refuses_version
from trainer_client.prompt_id import prompt_id

OLD, NEW = "rm@old", "rm@new"
A, B = "http://rm-a:8000", "http://rm-b:8000"
ITEMS = [{"prompt": f"p{i}", "response": "r" * (i + 1)} for i in range(8)]


@dataclass(frozen=True)
class Seen:
    """One request a fake replica saw, and what it answered."""

    replica: str
    path: str
    body: dict[str, Any]
    status: int
    version: str | None

    @property
    def pin(self) -> str | None:
        return self.body.get("model_version")


@dataclass
class FakeReplica:
    """A replica with ``loaded`` versions (the first one active). ``after_answer`` runs after
    each answer it gives (a swap in the middle of a call); ``ignores_pins``: a service that
    answers a pinned request with its active version rather than a 409."""

    url: str
    loaded: list[str]
    after_answer: Callable[[FakeReplica], None] | None = None
    ignores_pins: bool = False


@dataclass
class Fleet:
    replicas: dict[str, FakeReplica]
    seen: list[Seen] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        replica = self.replicas[f"{request.url.scheme}://{request.url.netloc.decode()}"]
        body = json.loads(request.content) if request.content else {}
        status, version, answer = self._answer(replica, request.url.path, body)
        self.seen.append(Seen(replica.url, request.url.path, body, status, version))
        if status == 200 and replica.after_answer is not None:
            replica.after_answer(replica)
        return httpx.Response(status, json=answer)

    def _answer(
        self, replica: FakeReplica, path: str, body: dict[str, Any]
    ) -> tuple[int, str | None, dict[str, Any]]:
        pin = body.get("model_version")
        if pin is not None and pin not in replica.loaded and not replica.ignores_pins:
            refusal = {
                "type": "version_not_loaded",
                "message": f"model version {pin} is not loaded",
                "details": {
                    "requested": pin,
                    "active": replica.loaded[0],
                    "loaded": replica.loaded,
                },
            }
            return 409, None, {"error": refusal}
        version = pin if pin in replica.loaded else replica.loaded[0]
        # The first loaded version is the active one; the others drain, as after a swap.
        state = "active" if version == replica.loaded[0] else "draining"
        model = {"name": "rm", "version": version, "state": state}
        items = body.get("items", [])
        if path == "/v1/rewards":
            results = [{"reward": 1.0, "tokens": 1, "truncated": False} for _ in items]
            return 200, version, {"model": model, "results": results}
        if path == "/v1/baselines":
            stats = {"n": 1, "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "stored": True}
            results = [{"prompt_id": prompt_id(i["prompt"]), **stats} for i in items]
            return (
                200,
                version,
                {"model": model, "stored": len(items), "failed": 0, "results": results},
            )
        rewards = [0.5 for _ in body["query"]]
        return 200, version, {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    def client(self, **options: Any) -> RewardClient:
        options.setdefault("retry", RetryPolicy(retries=0))
        return RewardClient(
            list(self.replicas), transport=httpx.MockTransport(self.handle), **options
        )

    def rewards_seen(self) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == "/v1/rewards"]


def fleet(*replicas: FakeReplica) -> Fleet:
    return Fleet({replica.url: replica for replica in replicas})


def versions_of(results: list[Any]) -> set[str]:
    return {result.model_version for result in results}


@pytest.mark.parametrize("ignores_pins", [False, True], ids=["409", "answers-another-version"])
def test_a_call_over_replicas_on_two_versions_gets_one_version(ignores_pins: bool) -> None:
    fakes = fleet(FakeReplica(A, [OLD]), FakeReplica(B, [NEW], ignores_pins=ignores_pins))
    with fakes.client(chunk_size=2) as client:
        results = client.score(ITEMS, contrastive=None)
    assert len(results) == len(ITEMS)
    seen = fakes.rewards_seen()
    first = seen[0]
    assert (first.replica, first.pin, first.version) == (A, None, OLD)
    assert versions_of(results) == {OLD}
    # Every later request is pinned to the first answer's version; B, which does not serve it,
    # refused once and was passed over for the rest of the call: A answered each chunk.
    assert {later.pin for later in seen[1:]} == {OLD}
    assert [(s.replica, s.status) for s in seen if s.replica == B] == [
        (B, 200 if ignores_pins else 409)
    ]
    assert sum(s.replica == A and s.status == 200 for s in seen) == len(ITEMS) // 2


def test_a_version_lost_in_the_middle_of_a_call_scores_it_again_unpinned() -> None:
    def unload_old(replica: FakeReplica) -> None:
        replica.loaded = [NEW]  # the swap on A finishes right after its first answer

    calls: list[tuple[str | None, str]] = []
    fakes = fleet(FakeReplica(A, [OLD], after_answer=unload_old), FakeReplica(B, [NEW]))
    with fakes.client(chunk_size=2, on_version_change=lambda *c: calls.append(c)) as client:
        results = client.score(ITEMS, contrastive=None)
        assert client.seen_model_version == NEW
    assert versions_of(results) == {NEW}
    assert len(results) == len(ITEMS)
    seen = fakes.rewards_seen()
    refused = [(s.replica, s.pin) for s in seen if s.status == 409]
    assert sorted(refused) == [(A, OLD), (B, OLD)]
    again = seen.index(next(s for s in seen[1:] if s.pin is None))
    assert all(s.status == 409 for s in seen[1:again])  # no OLD answer after the first one
    assert {s.pin for s in seen[again + 1 :]} == {NEW}
    assert calls == [(None, NEW)]  # the discarded OLD answer is never reported


def test_across_calls_the_client_never_goes_back_to_the_old_version() -> None:
    """A rollout: B has switched (OLD drains there), A has not. Once the client has seen NEW
    it pins every call to it, and A's refusals send them to B: never back to OLD."""
    calls: list[tuple[str | None, str]] = []
    fakes = fleet(FakeReplica(A, [OLD]), FakeReplica(B, [NEW, OLD]))
    with fakes.client(on_version_change=lambda *c: calls.append(c)) as client:
        # One request per call, so that round robin alternates the replicas call by call.
        per_call = [versions_of(client.score(ITEMS, contrastive=None)) for _ in range(8)]
        assert client.seen_model_version == NEW
    versions = [next(iter(v)) for v in per_call]
    changed = versions.index(NEW)
    assert versions == [OLD] * changed + [NEW] * (len(versions) - changed)
    assert calls == [(None, OLD), (OLD, NEW)]
    seen = fakes.rewards_seen()
    after = seen.index(next(s for s in seen if s.version == NEW)) + 1
    assert all(s.pin == NEW for s in seen[after:])
    assert {s.status for s in seen[after:] if s.replica == A} <= {409}
    assert all(s.version in (None, NEW) for s in seen[after:])


def test_a_draining_answer_moves_the_client_to_the_new_version_after_the_call() -> None:
    """One replica swaps: the call pinned to OLD is still served by it (draining), and says
    so; the next call goes unpinned and follows NEW, so the drain lasts one call."""
    calls: list[tuple[str | None, str]] = []
    replica = FakeReplica(A, [OLD])
    fakes = fleet(replica)
    with fakes.client(on_version_change=lambda *c: calls.append(c)) as client:
        client.score(ITEMS, contrastive=None)
        replica.loaded = [NEW, OLD]  # swapped: OLD drains
        fakes.seen.clear()
        during = versions_of(client.score(ITEMS, contrastive=None))
        after = [versions_of(client.score(ITEMS, contrastive=None)) for _ in range(2)]
    assert during == {OLD}  # a call that began pinned to OLD ends on it
    assert after == [{NEW}] * 2
    assert calls == [(None, OLD), (OLD, NEW)]
    assert [s.pin for s in fakes.rewards_seen()] == [OLD, None, NEW]


def test_a_rollback_everywhere_is_accepted_once() -> None:
    calls: list[tuple[str | None, str]] = []
    a, b = FakeReplica(A, [OLD]), FakeReplica(B, [OLD])
    fakes = fleet(a, b)
    with fakes.client(on_version_change=lambda *c: calls.append(c)) as client:
        client.score(ITEMS, contrastive=None)
        a.loaded = b.loaded = [NEW]  # swapped everywhere, OLD unloaded
        client.score(ITEMS, contrastive=None)  # OLD refused everywhere: scored again, NEW
        a.loaded = b.loaded = [OLD]  # NEW rolled back on every replica
        fakes.seen.clear()
        after = [versions_of(client.score(ITEMS, contrastive=None)) for _ in range(3)]
    assert calls == [(None, OLD), (OLD, NEW), (NEW, OLD)]
    assert after == [{OLD}] * 3
    seen = fakes.rewards_seen()
    assert sorted((s.replica, s.pin, s.status) for s in seen[:2]) == [
        (A, NEW, 409),
        (B, NEW, 409),
    ]
    assert (seen[2].pin, seen[2].status) == (None, 200)  # the call scored again, unpinned
    assert {s.pin for s in seen[3:]} == {OLD}  # then followed: later calls pinned to OLD


def test_an_upload_answered_by_a_replica_behind_is_not_a_change() -> None:
    calls: list[tuple[str | None, str]] = []
    a, b = FakeReplica(A, [OLD]), FakeReplica(B, [OLD])
    fakes = fleet(a, b)
    with fakes.client(on_version_change=lambda *c: calls.append(c)) as client:
        client.score(ITEMS, contrastive=None)
        a.loaded = b.loaded = [NEW]  # swapped everywhere, OLD unloaded
        client.score(ITEMS, contrastive=None)  # OLD refused everywhere: scored again, NEW
        a.loaded = [OLD]  # A restarted on the old version: behind
        pushed = [client.push_baselines([{"prompt": "p", "responses": ["a"]}]) for _ in "ab"]
        assert client.seen_model_version == NEW
    assert sorted(p.model.version for p in pushed if p.model) == [NEW, OLD]  # each its own
    assert calls == [(None, OLD), (OLD, NEW)]


def test_a_pin_of_the_caller_is_passed_over_replicas_that_lack_it_never_replaced() -> None:
    fakes = fleet(FakeReplica(A, [OLD]), FakeReplica(B, [NEW]))
    with fakes.client(chunk_size=2, model_version=NEW) as client:
        assert versions_of(client.score(ITEMS, contrastive=None)) == {NEW}
        client.model_version = "rm@gone"
        with pytest.raises(RewardServiceError) as caught:
            client.score(ITEMS, contrastive=None)
    assert (caught.value.status, caught.value.error_type) == (409, "version_not_loaded")
    assert caught.value.details["requested"] == "rm@gone"
    assert all(s.pin in (NEW, "rm@gone") for s in fakes.rewards_seen())
    assert not [s for s in fakes.rewards_seen() if s.pin == "rm@gone" and s.status != 409]


@pytest.mark.parametrize("model", [None, "harmless"])
def test_the_model_name_is_sent_when_set(model: str | None) -> None:
    fakes = fleet(FakeReplica(A, [OLD]))
    with fakes.client(chunk_size=2, model=model) as client:
        client.score(ITEMS, contrastive=None)
        client.push_baselines([{"prompt": "p", "responses": ["a"]}])
        client.get_reward(["q"])
    bodies = [s.body for s in fakes.seen if s.path != "/get_reward"]
    assert {s.path for s in fakes.seen} == {"/v1/rewards", "/v1/baselines", "/get_reward"}
    assert [body.get("model") for body in bodies] == [model] * len(bodies)
    assert ("model" in bodies[0]) is (model is not None)


def test_get_reward_names_the_model_in_its_query_string() -> None:
    urls: list[httpx.URL] = []
    fakes = fleet(FakeReplica(A, [OLD]))

    def handle(request: httpx.Request) -> httpx.Response:
        urls.append(request.url)
        return fakes.handle(request)

    transport = httpx.MockTransport(handle)
    with RewardClient(A, model="harm less", transport=transport) as client:
        client.get_reward(["q"])
    assert [url.params.get("model") for url in urls] == ["harm less"]


@pytest.mark.parametrize(
    ("status", "error_type", "details", "refuses"),
    [
        (409, "version_not_loaded", {"requested": OLD, "active": NEW, "loaded": [NEW]}, True),
        (409, "conflict", {"reason": "version_not_loaded", "active": NEW}, True),
        (409, "conflict", {"requested": OLD, "active": NEW}, True),  # a service before models
        (409, "conflict", {"requested": "rm@other"}, False),
        (409, "conflict", None, False),
        (422, "validation_error", {"requested": OLD}, False),
    ],
)
def test_which_answers_say_the_replica_lacks_the_version(
    status: int, error_type: str, details: object, refuses: bool
) -> None:
    error = RewardServiceError("no", status=status, error_type=error_type, details=details)
    assert _refuses_version(error, OLD) is refuses
