"""RewardClient and AsyncRewardClient against real `crs-service serve` processes: order across
chunks, retries (through a fault-injecting proxy), two replicas sharing one redis-server (baselines
pushed once, one replica dying mid-run), model swaps and pinning, auth, the async twin, a baseline
round trip, and an append retried after its answer was lost."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fault_proxy import Fault, FaultProxy
from tests.models import mixed_items
from trainer_client import (
    AsyncRewardClient,
    EndpointNotFound,
    RetryPolicy,
    RewardClient,
    RewardResult,
    RewardServiceError,
    prompt_id,
)
from trainer_client.launch import RedisProcess, ServiceProcess

TOLERANCE = 1e-4
TOKEN = "client-e2e-token"
# Quick retries, so that waits measured in a test come from Retry-After, not from backoff.
FAST = RetryPolicy(retries=3, base_s=0.01, max_s=0.05)
PAIRS = mixed_items(12, seed=5, max_words=20)
# This module's own database on the session's redis-server (other tests flush database 0).
SHARED_DB = 14


@dataclass(frozen=True)
class Fleet:
    """primary: tiny llama (seed 0); doomed: the same model, killed by one test; the two are
    replicas sharing one Redis database. seed7: another version, behind a bearer token."""

    primary: ServiceProcess
    doomed: ServiceProcess
    seed7: ServiceProcess


@pytest.fixture(scope="module")
def fleet(
    tiny_llama: Path, redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    from service.scoring.tiny import build_tiny_model

    seed7 = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-7", "llama", seed=7)
    shared = ["--redis-url", redis_server.url.rsplit("/", 1)[0] + f"/{SHARED_DB}"]
    servers = Fleet(
        primary=ServiceProcess(tiny_llama, args=shared),
        doomed=ServiceProcess(tiny_llama, args=shared),
        seed7=ServiceProcess(seed7, env={"CRS_API_TOKENS": TOKEN}),
    )
    with contextlib.ExitStack() as stack:
        # Started together, then waited for: the start-ups overlap.
        for server in (servers.primary, servers.doomed, servers.seed7):
            stack.enter_context(server)
        for server in (servers.primary, servers.doomed, servers.seed7):
            server.wait_ready()
        yield servers


@pytest.fixture
def proxy(fleet: Fleet) -> Iterator[FaultProxy]:
    with FaultProxy(fleet.primary.url) as running:
        yield running


def direct_rewards(url: str, items: Sequence[dict[str, Any]]) -> list[float]:
    """The rewards of one plain request, without the client."""
    body = {"items": list(items), "contrastive": None}
    response = httpx.post(f"{url}/v1/rewards", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [result["reward"] for result in response.json()["results"]]


def rewards(results: Sequence[RewardResult]) -> list[float]:
    return [result.reward for result in results]


def test_order_is_kept_across_chunks_and_concurrent_requests(
    fleet: Fleet, proxy: FaultProxy
) -> None:
    items = mixed_items(300, seed=1, max_words=30)
    expected = direct_rewards(fleet.primary.url, items)
    with RewardClient(proxy.url, chunk_size=32, max_concurrency=4) as client:
        results = client.score(items, contrastive=None)
    assert rewards(results) == pytest.approx(expected, abs=TOLERANCE)
    # Neighbours differ by far more than the tolerance: chunks out of place would show above.
    steps = np.abs(np.diff(expected))
    assert np.mean(steps > 10 * TOLERANCE) > 0.9
    assert len(proxy.paths("/v1/rewards")) == 10  # ceil(300 / 32) requests
    assert 2 <= proxy.max_in_flight <= 4


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, "1"), (503, "1"), (504, None)], ids=["429", "503", "504"]
)
def test_transient_refusals_are_retried_after_retry_after(
    fleet: Fleet, proxy: FaultProxy, status: int, retry_after: str | None
) -> None:
    proxy.inject(status, 2, retry_after=retry_after)
    with RewardClient(proxy.url, retry=FAST) as client:
        results = client.score(PAIRS, contrastive=None)
    seen = proxy.paths("/v1/rewards")
    assert [request.status for request in seen] == [status, status, 200]
    gaps = [later.at - earlier.at for earlier, later in zip(seen, seen[1:], strict=False)]
    assert min(gaps) >= float(retry_after or 0)
    assert rewards(results) == pytest.approx(
        direct_rewards(fleet.primary.url, PAIRS), abs=TOLERANCE
    )


def test_retries_run_out_with_the_servers_error(proxy: FaultProxy) -> None:
    proxy.inject(429, 10)
    with RewardClient(proxy.url, retry=FAST) as client, pytest.raises(RewardServiceError) as caught:
        client.score(PAIRS)
    assert (caught.value.status, caught.value.error_type, caught.value.retries) == (
        429,
        "overloaded",
        FAST.retries,
    )
    assert len(proxy.paths("/v1/rewards")) == FAST.retries + 1


def test_a_validation_error_is_raised_at_once_with_its_details(proxy: FaultProxy) -> None:
    items = mixed_items(40, seed=6, max_words=10)
    items[37]["prompt"] = ""  # the client leaves value rules to the service: a 422
    with (
        RewardClient(proxy.url, chunk_size=32, retry=FAST) as client,
        pytest.raises(RewardServiceError) as caught,
    ):
        client.score(items)
    error = caught.value
    assert (error.status, error.error_type, error.retries) == (422, "validation_error", 0)
    assert error.offset == 32
    assert error.details[0]["loc"][:3] == ["items", 5, "prompt"]  # 32 + 5 = item 37
    assert "prompt" in error.message
    assert [request.status for request in proxy.paths("/v1/rewards")].count(422) == 1


def test_a_replica_answering_503_is_skipped_during_its_cooldown(
    fleet: Fleet, proxy: FaultProxy
) -> None:
    proxy.always = Fault(503, retry_after="3")
    items = mixed_items(60, seed=7, max_words=10)
    started = time.monotonic()
    with RewardClient(
        [proxy.url, fleet.primary.url], chunk_size=10, max_concurrency=1, retry=FAST
    ) as client:
        results = client.score(items, contrastive=None)
    # Round robin alone would send it every other request of the six.
    assert len(proxy.paths("/v1/rewards")) == 1
    # The other replica was up: no waiting out the Retry-After.
    assert time.monotonic() - started < 2.5
    assert rewards(results) == pytest.approx(
        direct_rewards(fleet.primary.url, items), abs=TOLERANCE
    )


def metric(server: ServiceProcess, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample of ``server`` over the samples with ``labels``."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def items_scored(server: ServiceProcess) -> float:
    return metric(server, "crs_items_scored_total")


def baseline_lookups(server: ServiceProcess, source: str) -> float:
    return metric(server, "crs_baseline_lookups_total", source=source)


def pushes(servers: Sequence[ServiceProcess]) -> float:
    """``PUT /v1/baselines`` requests the servers answered, whatever the status."""
    return sum(
        metric(server, "crs_requests_total", route="/v1/baselines", method="PUT")
        for server in servers
    )


# Prompts of the run below, with their stored baseline responses (three each).
SHARED_BASELINES = [
    {"prompt": pair["prompt"], "responses": [pair["response"], f"shared {n}", "a third answer"]}
    for n, pair in enumerate(mixed_items(40, seed=11, max_words=20))
]


def run_items(count: int) -> list[dict[str, Any]]:
    """``count`` items over the shared baselines' prompts, each with a response of its own."""
    responses = mixed_items(count, seed=2, max_words=30)
    return [
        {"prompt": SHARED_BASELINES[n % len(SHARED_BASELINES)]["prompt"], "response": r["response"]}
        for n, r in enumerate(responses)
    ]


def lookups(server: ServiceProcess, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One plain contrastive request to ``server`` alone."""
    body = {"items": list(items), "contrastive": {"aggregate": "mean"}}
    response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=120)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def test_baselines_pushed_once_are_hits_on_both_replicas_and_a_kill_mid_run_loses_nothing(
    fleet: Fleet,
) -> None:
    """Two replicas sharing one Redis behind the client's replica list: baselines pushed once
    (one request, so one replica stored them) are cache hits on both; then one replica is
    SIGKILLed during a contrastive run and every item still gets its one answer, equal to the
    surviving replica's own."""
    replicas = [fleet.doomed, fleet.primary]
    urls = [replica.url for replica in replicas]
    pushes_before = pushes(replicas)
    with RewardClient(urls, retry=FAST) as client:
        pushed = client.push_baselines(SHARED_BASELINES)
    assert (pushed.stored, pushed.failed) == (len(SHARED_BASELINES), 0)
    assert pushes(replicas) - pushes_before == 1
    means = {result.prompt_id: result.mean for result in pushed.results}
    expected_means = [means[prompt_id(b["prompt"])] for b in SHARED_BASELINES]

    # Hits on both, without computing: the replica the push did not reach knows the prompts
    # only through Redis.
    probes = [{"prompt": b["prompt"], "response": "a probe answer"} for b in SHARED_BASELINES]
    for replica in replicas:
        before = {s: baseline_lookups(replica, s) for s in ("cache", "computed")}
        answered = lookups(replica, probes)
        assert [r["baseline_source"] for r in answered] == ["cache"] * len(probes), replica.url
        assert [r["baseline"] for r in answered] == pytest.approx(expected_means, abs=TOLERANCE)
        assert baseline_lookups(replica, "cache") - before["cache"] == len(probes)
        assert baseline_lookups(replica, "computed") == before["computed"]

    items = run_items(2000)
    expected = direct_rewards(fleet.primary.url, items)
    baselines = [expected_means[n % len(SHARED_BASELINES)] for n in range(len(items))]
    versions: list[tuple[str | None, str]] = []
    client = RewardClient(
        urls,
        chunk_size=50,
        max_concurrency=4,
        retry=RetryPolicy(retries=5, base_s=0.05, max_s=0.5),
        on_version_change=lambda old, new: versions.append((old, new)),
    )
    scored_before = items_scored(fleet.doomed)  # the probes above count too
    with client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.score, items, {"aggregate": "mean"})
        deadline = time.monotonic() + 120
        while items_scored(fleet.doomed) == scored_before and time.monotonic() < deadline:
            time.sleep(0.02)
        fleet.doomed.signal(signal.SIGKILL)
        assert not running.done(), "the run ended before the kill: nothing was tested"
        results = running.result(timeout=120)
    assert fleet.doomed.process is not None
    assert fleet.doomed.process.wait(10) == -signal.SIGKILL
    # One answer per item, in order: each matches its own item's reward and prompt's baseline.
    assert len(results) == len(items)
    assert rewards(results) == pytest.approx(expected, abs=TOLERANCE)
    assert {r.baseline_source for r in results} == {"cache"}
    assert [r.baseline for r in results] == pytest.approx(baselines, abs=TOLERANCE)
    assert [r.contrastive for r in results] == pytest.approx(
        np.subtract(expected, baselines), abs=TOLERANCE
    )
    assert len(versions) == 1  # both replicas serve one version


def test_the_version_hook_fires_once_per_swap(fleet: Fleet, proxy: FaultProxy) -> None:
    calls: list[tuple[str | None, str]] = []
    with RewardClient(
        proxy.url, token=TOKEN, chunk_size=4, on_version_change=lambda *c: calls.append(c)
    ) as client:
        before = client.score(PAIRS, contrastive=None)
        proxy.upstream = fleet.seed7.url  # the swap
        after = client.score(PAIRS, contrastive=None)
        again = client.score(PAIRS, contrastive=None)
        seen = client.seen_model_version
    old, new = before[0].model_version, after[0].model_version
    assert old != new
    assert calls == [(None, old), (old, new)]
    assert {r.model_version for r in before} == {old}
    assert {r.model_version for r in after + again} == {new} == {seen}
    assert rewards(after) != pytest.approx(rewards(before), abs=TOLERANCE)


def test_a_pinned_version_gets_a_conflict_after_a_swap_without_retries(
    fleet: Fleet, proxy: FaultProxy
) -> None:
    with RewardClient(proxy.url, token=TOKEN, retry=FAST) as probe:
        version = probe.score(PAIRS[:1], contrastive=None)[0].model_version
    with RewardClient(proxy.url, token=TOKEN, retry=FAST, model_version=version) as client:
        assert client.score(PAIRS, contrastive=None)[0].model_version == version
        proxy.upstream = fleet.seed7.url
        with pytest.raises(RewardServiceError) as caught:
            client.score(PAIRS, contrastive=None)
    assert (caught.value.status, caught.value.error_type) == (409, "conflict")
    assert caught.value.details["requested"] == version
    assert [request.status for request in proxy.paths("/v1/rewards")] == [200, 200, 409]


def test_calling_the_client_from_its_own_hook_is_refused_not_deadlocked(fleet: Fleet) -> None:
    def hook(old: str | None, new: str) -> None:
        client.score(PAIRS[:1])  # the hook runs on the loop this call would wait for

    with RewardClient(fleet.primary.url, on_version_change=hook) as client:
        with pytest.raises(RuntimeError, match="deadlock"):
            client.score(PAIRS[:1])
        assert len(client.score(PAIRS[:2])) == 2  # the version is seen now: no hook, no error


def test_the_bearer_token_is_sent(fleet: Fleet) -> None:
    with (
        RewardClient(fleet.seed7.url, retry=FAST) as anonymous,
        pytest.raises(RewardServiceError) as caught,
    ):
        anonymous.score(PAIRS[:2])
    assert (caught.value.status, caught.value.error_type, caught.value.retries) == (
        401,
        "unauthorized",
        0,
    )
    with RewardClient(fleet.seed7.url, token=TOKEN) as client:
        assert len(client.score(PAIRS[:2])) == 2


def assert_same_results(left: Sequence[RewardResult], right: Sequence[RewardResult]) -> None:
    """Equal results, but for float noise of the batches the items happened to share."""
    floats = {"reward", "contrastive"}
    for name in floats:
        assert [getattr(r, name) for r in left] == pytest.approx(
            [getattr(r, name) for r in right], abs=TOLERANCE
        )
    assert [r.model_dump(exclude=floats) for r in left] == [
        r.model_dump(exclude=floats) for r in right
    ]


def test_the_async_client_gives_the_sync_clients_results(fleet: Fleet) -> None:
    items = mixed_items(100, seed=3, max_words=30)
    url = fleet.primary.url
    with RewardClient(url, chunk_size=16) as client:
        expected = client.score(items, contrastive={"on_missing": "raw"})

    async def score_async() -> list[RewardResult]:
        async with AsyncRewardClient(url, chunk_size=16) as client:
            return await client.score(items, contrastive={"on_missing": "raw"})

    async def score_sync_inside_a_running_loop() -> list[RewardResult]:
        # As TRL does: a synchronous reward function called from a coroutine.
        with RewardClient(url, chunk_size=64) as client:
            return client.score(items, contrastive={"on_missing": "raw"})

    assert_same_results(asyncio.run(score_async()), expected)
    assert_same_results(asyncio.run(score_sync_inside_a_running_loop()), expected)
    # on_missing raw: without baselines, the contrastive reward is the reward.
    assert [r.contrastive for r in expected] == rewards(expected)


def test_push_baselines_round_trip(fleet: Fleet) -> None:
    baselines: list[dict[str, Any]] = [
        {"prompt": f"Round trip question {n}?", "responses": [f"answer {n}.{j}" for j in range(3)]}
        for n in range(5)
    ]
    baselines[1]["prompt"] = [{"role": "user", "content": "Round trip chat?"}]
    baselines[2]["prompt_id"] = "round-trip-2"
    pairs = [{"prompt": b["prompt"], "response": r} for b in baselines for r in b["responses"]]
    queries = [{"prompt": b["prompt"], "response": "A fine answer."} for b in baselines]
    queries[2]["prompt_id"] = "round-trip-2"
    # Seven responses per request: whole prompts of three, so three requests.
    with RewardClient(fleet.primary.url, chunk_size=7) as client:
        pushed = client.push_baselines(baselines)
        raw = client.score(pairs, contrastive=None)
        scored = client.score(queries)
    means = np.array(rewards(raw)).reshape(5, 3).mean(axis=1)
    assert (pushed.stored, pushed.failed) == (5, 0)
    assert [r.prompt_id for r in pushed.results] == [
        prompt_id(b["prompt"], b.get("prompt_id")) for b in baselines
    ]
    assert [r.mean for r in pushed.results] == pytest.approx(means, abs=TOLERANCE)
    assert pushed.model is not None
    assert {r.model_version for r in pushed.results} == {pushed.model.version}
    assert [(r.baseline_source, r.baseline_n) for r in scored] == [("cache", 3)] * 5
    assert [r.baseline for r in scored] == pytest.approx(means, abs=TOLERANCE)
    assert [r.contrastive for r in scored] == pytest.approx(
        [r.reward - m for r, m in zip(scored, means, strict=True)], abs=TOLERANCE
    )


def stored_responses(url: str, pid: str) -> list[str]:
    answer = httpx.get(f"{url}/v1/baselines/{pid}", timeout=30)
    assert answer.status_code == 200, answer.text
    responses: list[str] = answer.json()["responses"]
    return responses


@pytest.mark.parametrize("status", [503, 504])
def test_an_append_whose_answer_is_lost_is_retried_and_stored_once(
    fleet: Fleet, proxy: FaultProxy, status: int
) -> None:
    # The append reaches the service and is stored; its answer is replaced by a refusal.
    ids = [f"lost-{status}-{n}" for n in range(3)]
    items = [{"prompt_id": pid, "prompt": f"Lost {pid}?", "responses": ["a", "b"]} for pid in ids]
    proxy.inject(status, forward_first=True)
    with RewardClient(proxy.url, retry=FAST) as client:
        pushed = client.push_baselines(items, mode="append")

    assert [request.status for request in proxy.paths("/v1/baselines")] == [status, 200]
    assert [stored_responses(fleet.primary.url, pid) for pid in ids] == [["a", "b"]] * 3
    assert (pushed.stored, pushed.failed) == (3, 0)
    assert [(r.duplicate, r.n) for r in pushed.results] == [(True, 2)] * 3


def test_models_or_a_clear_error_when_the_service_has_no_models_endpoint(
    fleet: Fleet, proxy: FaultProxy
) -> None:
    served = httpx.get(f"{fleet.primary.url}/v1/models", timeout=10).status_code != 404
    with RewardClient(proxy.url, retry=FAST) as client:
        version = client.score(PAIRS[:1], contrastive=None)[0].model_version
        if served:
            assert client.models().active == version
        else:
            with pytest.raises(EndpointNotFound, match=r"GET /v1/models") as caught:
                client.models()
            assert caught.value.status == 404
            assert len(proxy.paths("/v1/models")) == 1  # a 404 is not retried
