"""The rebaseline pass against a real ``redis-server``: it pages through the prompt index with
SSCAN (300 prompts are more than Redis keeps in one compact set, so the pages are real), rescores
what the new version has not cached, and fails with the reason when Redis goes away midway."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from service.baselines.rebaseline import RebaselineProgress, rebaseline
from service.baselines.redis_store import RedisBaselineStore, connect
from service.baselines.store import StoreUnavailable
from service.scoring.types import RewardInput
from service.settings import Settings
from tests.integration.test_baseline_stores import NoMetrics
from tests.unit.test_rebaseline import (
    NEW,
    NO_WAIT,
    TOO_LONG,
    LengthLease,
    expected_rewards,
    responses,
    rewards_under,
    write,
)
from trainer_client.launch import RedisProcess

PROMPTS = 300
PER_BATCH = 16
FAST_FAILING = {"redis_socket_timeout_s": 0.5, "redis_connect_timeout_s": 0.5, "redis_retries": 0}


async def fresh_store(server: RedisProcess, metrics: NoMetrics | None = None) -> RedisBaselineStore:
    store = connect(Settings(redis_url=server.url, **FAST_FAILING), metrics or NoMetrics())
    await store._client.flushdb()
    return store


async def fill(store: RedisBaselineStore, count: int = PROMPTS) -> None:
    for start in range(0, count, 100):
        outcomes = await store.write([write(i) for i in range(start, min(start + 100, count))])
        assert all(outcome.written for outcome in outcomes)


def all_pairs(count: int = PROMPTS) -> list[str]:
    return sorted(f"prompt {i}" for i in range(count) for _ in responses(i))


def test_prompt_ids_page_through_the_whole_index(redis_server: RedisProcess) -> None:
    async def body() -> None:
        metrics = NoMetrics()
        store = await fresh_store(redis_server, metrics)
        try:
            await fill(store)
            cursor, pages, seen = "", 0, set()
            while True:
                cursor, ids = await store.prompt_ids(cursor, PER_BATCH)
                pages, seen = pages + 1, seen | set(ids)
                if not cursor:
                    break
            assert seen == {f"p{i:03d}" for i in range(PROMPTS)}
            assert pages > PROMPTS // (4 * PER_BATCH)  # really paged, not one answer
            assert ("scan", False) in metrics.ops
        finally:
            await store.aclose()

    asyncio.run(body())


def test_every_prompt_is_rescored_across_many_pages(redis_server: RedisProcess) -> None:
    async def body() -> None:
        store = await fresh_store(redis_server)
        try:
            await fill(store)
            lease = LengthLease()
            progress = await rebaseline(
                store, lease, RebaselineProgress(), prompts_per_batch=PER_BATCH
            )
            assert (progress.state, progress.error) == ("done", None)
            assert (progress.prompts_total, progress.prompts_done) == (PROMPTS, PROMPTS)
            assert progress.responses_scored == len(all_pairs())
            assert sorted(lease.scored_prompts()) == all_pairs()  # each response once
            assert len(lease.calls) > PROMPTS // (4 * PER_BATCH)
            assert all(len({p.prompt for p in call}) <= PER_BATCH for call in lease.calls)
            assert await rewards_under(store, NEW, PROMPTS) == expected_rewards(PROMPTS)
            assert await store.counts(NEW) == (PROMPTS, PROMPTS)
        finally:
            await store.aclose()

    asyncio.run(body())


def test_prompts_the_version_cached_already_are_not_rescored(redis_server: RedisProcess) -> None:
    async def body() -> None:
        store = await fresh_store(redis_server)
        try:
            await fill(store)
            # Another replica's pass got through the first 100 prompts before this one.
            done = [write(i, NEW, rewards=[7.0] * len(responses(i))) for i in range(100)]
            assert all(outcome.written for outcome in await store.write(done))
            lease = LengthLease()
            progress = await rebaseline(
                store, lease, RebaselineProgress(), prompts_per_batch=PER_BATCH
            )
            assert progress.state == "done"
            assert progress.prompts_cached_already == 100
            assert progress.prompts_done == PROMPTS
            assert set(lease.scored_prompts()) == {f"prompt {i}" for i in range(100, PROMPTS)}
            after = await rewards_under(store, NEW, PROMPTS)
            assert all(after[f"p{i:03d}"] == [7.0] * len(responses(i)) for i in range(100))
            expected = expected_rewards(PROMPTS)
            assert all(after[f"p{i:03d}"] == expected[f"p{i:03d}"] for i in range(100, PROMPTS))
        finally:
            await store.aclose()

    asyncio.run(body())


def test_a_page_with_a_refused_item_still_rescores_the_others(redis_server: RedisProcess) -> None:
    async def body() -> None:
        store = await fresh_store(redis_server)
        try:
            await fill(store)
            await store.write([write(42, responses=["fine", TOO_LONG, "also fine"])])
            lease = LengthLease()
            progress = await rebaseline(
                store, lease, RebaselineProgress(), prompts_per_batch=PER_BATCH
            )
            assert (progress.state, progress.prompts_failed) == ("done", 1)
            after = await rewards_under(store, NEW, PROMPTS)
            assert after.pop("p042") is None
            expected = expected_rewards(PROMPTS)
            del expected["p042"]
            assert after == expected
        finally:
            await store.aclose()

    asyncio.run(body())


@pytest.fixture
def own_redis(tmp_path: Path) -> RedisProcess:
    """A redis-server this test may kill (not the session's)."""
    return RedisProcess(tmp_path / "redis")


def test_redis_going_away_midway_fails_the_pass_with_the_reason(own_redis: RedisProcess) -> None:
    class KillingLease(LengthLease):
        """Redis dies while the third page is being scored."""

        async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
            rewards = await super().score(pairs)
            if len(self.calls) == 3:
                own_redis.kill()
            return rewards

    async def body() -> None:
        metrics = NoMetrics()
        store = await fresh_store(own_redis, metrics)
        try:
            await fill(store)
            lease = KillingLease()
            progress = await rebaseline(
                store,
                lease,
                RebaselineProgress(),
                prompts_per_batch=PER_BATCH,
                retry=NO_WAIT,
            )
            assert progress.state == "failed"
            assert progress.error is not None
            assert progress.error.startswith("baseline store cache failed 3 times in a row")
            assert "ConnectionError" in progress.error
            before = {pair.prompt for call in lease.calls[:2] for pair in call}
            assert progress.prompts_done == len(before)  # the pages before it, cached
            assert progress.responses_scored == sum(len(call) for call in lease.calls[:2])
            assert progress.finished_at is not None
            assert ("cache", True) in metrics.ops  # observed like any store operation
            with pytest.raises(StoreUnavailable, match="redis scan failed"):
                await store.prompt_ids("", PER_BATCH)
            assert ("scan", True) in metrics.ops
        finally:
            await store.aclose()

    with own_redis:
        asyncio.run(body())
