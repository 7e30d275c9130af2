"""The rebaseline pass on the in-process store, with a scoring lease whose rewards are a known
function of each pair: every stored prompt is rescored once under the new version, what that
version cached already costs nothing, a refused item costs only its prompt, a store that stays
down fails the pass with the reason."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.baselines.memory import MemoryBaselineStore
from service.baselines.rebaseline import RebaselineProgress, StoreRetry, rebaseline
from service.baselines.store import BaselineStore, BaselineWrite, StoreUnavailable
from service.metrics import Metrics
from service.scoring.types import InputTooLong, NonFiniteReward, RewardInput
from tests.unit.test_api import metric

OLD, NEW = "rm@000000000001", "rm@000000000002"
NO_WAIT = StoreRetry(attempts=3, backoff_s=0)
TOO_LONG = "a response the scorer refuses"
NOT_FINITE = "a response the model gives NaN for"


def reward_of(prompt: Any, response: str) -> float:
    """The lease's rewards: they depend on the prompt stored with the responses, too."""
    return float(len(response)) + len(str(prompt)) / 1000


@dataclass
class LengthLease:
    """A scoring lease of version ``version`` that records every call it gets."""

    version: str = NEW
    calls: list[list[RewardInput]] = field(default_factory=list)
    progress: RebaselineProgress | None = None
    # prompts_done as each call saw it (the progress is read while the pass runs)
    done_seen: list[int] = field(default_factory=list)

    async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
        self.calls.append(list(pairs))
        if self.progress is not None:
            self.done_seen.append(self.progress.prompts_done)
        if too_long := [i for i, p in enumerate(pairs) if p.response == TOO_LONG]:
            raise InputTooLong(dict.fromkeys(too_long, 9999), 512)
        if nan := [i for i, p in enumerate(pairs) if p.response == NOT_FINITE]:
            raise NonFiniteReward(nan)
        return [reward_of(p.prompt, p.response) for p in pairs]

    def scored_prompts(self) -> list[Any]:
        return [pair.prompt for call in self.calls for pair in call]


def responses(index: int) -> list[str]:
    return [f"r{index}" + "x" * j for j in range(1 + index % 3)]


def write(index: int, version: str = OLD, **kwargs: Any) -> BaselineWrite:
    given = kwargs.pop("responses", responses(index))
    return BaselineWrite(
        prompt_id=f"p{index:03d}",
        prompt=kwargs.pop("prompt", f"prompt {index}"),
        responses=given,
        version=version,
        rewards=kwargs.pop("rewards", [-1.0] * len(given)),
    )


async def filled(store: BaselineStore, count: int) -> BaselineStore:
    outcomes = await store.write([write(i) for i in range(count)])
    assert all(outcome.written for outcome in outcomes)
    return store


async def rewards_under(store: BaselineStore, version: str, count: int) -> dict[str, Any]:
    found = await store.lookup([f"p{i:03d}" for i in range(count)], version)
    return {pid: stored.rewards for pid, stored in found.items()}


def expected_rewards(count: int) -> dict[str, list[float]]:
    return {f"p{i:03d}": [reward_of(f"prompt {i}", r) for r in responses(i)] for i in range(count)}


def test_every_prompt_is_rescored_once_page_by_page() -> None:
    async def body() -> None:
        store = await filled(MemoryBaselineStore(), 50)
        progress = RebaselineProgress()
        lease = LengthLease(progress=progress)
        result = await rebaseline(store, lease, progress, prompts_per_batch=8)
        assert result is progress
        assert progress.state == "done"
        assert progress.error is None
        assert await rewards_under(store, NEW, 50) == expected_rewards(50)
        assert len(lease.calls) == 7  # one call per page of 8 prompts (50 = 6 * 8 + 2)
        assert sorted(lease.scored_prompts()) == sorted(
            f"prompt {i}" for i in range(50) for _ in responses(i)
        )
        assert lease.done_seen == [0, 8, 16, 24, 32, 40, 48]  # readable while it runs
        assert (progress.prompts_total, progress.prompts_done) == (50, 50)
        assert progress.responses_scored == sum(len(responses(i)) for i in range(50))
        assert (progress.prompts_cached_already, progress.prompts_failed) == (0, 0)
        assert progress.finished_at is not None
        assert progress.finished_at >= progress.started_at
        # The old version's rewards stay until deleted.
        assert set(map(tuple, (await rewards_under(store, OLD, 50)).values())) == {
            (-1.0,),
            (-1.0, -1.0),
            (-1.0, -1.0, -1.0),
        }

    asyncio.run(body())


def test_prompts_the_version_scored_already_are_not_scored_again() -> None:
    async def body() -> None:
        store = await filled(MemoryBaselineStore(), 20)
        # Another replica rescored prompts 0-4 with the new version already.
        mine = [write(i, NEW, rewards=[7.0] * len(responses(i))) for i in range(5)]
        await store.write(mine)
        lease = LengthLease()
        progress = await rebaseline(store, lease, RebaselineProgress(), prompts_per_batch=8)
        assert progress.state == "done"
        assert progress.prompts_cached_already == 5
        assert progress.prompts_done == 20
        scored = set(lease.scored_prompts())
        assert scored == {f"prompt {i}" for i in range(5, 20)}
        after = await rewards_under(store, NEW, 20)
        assert after["p000"] == [7.0]  # left as they were
        assert after["p019"] == expected_rewards(20)["p019"]

        again = LengthLease()
        second = await rebaseline(store, again, RebaselineProgress())
        assert again.calls == []  # a second pass computes nothing
        assert (second.prompts_cached_already, second.responses_scored) == (20, 0)

    asyncio.run(body())


@pytest.mark.parametrize("bad", [TOO_LONG, NOT_FINITE])
def test_a_refused_item_costs_only_its_prompt(bad: str) -> None:
    async def body() -> None:
        store = await filled(MemoryBaselineStore(), 12)
        await store.write([write(3, responses=["fine", bad])])
        lease = LengthLease()
        progress = await rebaseline(store, lease, RebaselineProgress(), prompts_per_batch=8)
        assert progress.state == "done"
        assert progress.prompts_failed == 1
        assert progress.prompts_done == 12
        after = await rewards_under(store, NEW, 12)
        assert after.pop("p003") is None  # left to be computed at first use
        expected = expected_rewards(12)
        del expected["p003"]
        assert after == expected
        # The refused page went prompt by prompt: 1 page call + 8 single calls + the next page.
        assert [len({p.prompt for p in call}) for call in lease.calls] == [8] + [1] * 8 + [4]

    asyncio.run(body())


def test_prompts_with_nothing_to_score_are_counted_failed() -> None:
    async def body() -> None:
        store = await filled(MemoryBaselineStore(), 3)
        await store.write([write(9, responses=[])])
        lease = LengthLease()
        progress = await rebaseline(store, lease, RebaselineProgress())
        assert (progress.state, progress.prompts_failed, progress.prompts_done) == ("done", 1, 4)
        assert "prompt 9" not in lease.scored_prompts()

    asyncio.run(body())


class FlakyStore(MemoryBaselineStore):
    """Its lookups fail ``failures`` times in a row from the ``after``-th one on."""

    def __init__(self, *, after: int, failures: int) -> None:
        super().__init__()
        self.after, self.failures, self.lookups = after, failures, 0

    async def lookup(self, *args: Any, **kwargs: Any) -> Any:
        self.lookups += 1
        if self.after <= self.lookups < self.after + self.failures:
            raise StoreUnavailable("redis lookup failed: ConnectionError: refused")
        return await super().lookup(*args, **kwargs)


def test_a_store_that_fails_briefly_is_retried() -> None:
    async def body() -> None:
        store = await filled(FlakyStore(after=2, failures=2), 30)
        progress = await rebaseline(
            store, LengthLease(), RebaselineProgress(), prompts_per_batch=8, retry=NO_WAIT
        )
        assert progress.state == "done"
        assert await rewards_under(store, NEW, 30) == expected_rewards(30)

    asyncio.run(body())


def test_a_store_that_stays_down_fails_the_pass_with_the_reason() -> None:
    async def body() -> None:
        store = await filled(FlakyStore(after=2, failures=100), 30)
        progress = await rebaseline(
            store, LengthLease(), RebaselineProgress(), prompts_per_batch=8, retry=NO_WAIT
        )
        assert progress.state == "failed"
        assert progress.error is not None
        assert "baseline store lookup failed 3 times" in progress.error
        assert "ConnectionError: refused" in progress.error
        assert progress.prompts_done == 8  # the first page, before the store went away
        assert store.lookups == 4
        assert progress.finished_at is not None

    asyncio.run(body())


def test_a_scorer_that_fails_fails_the_pass() -> None:
    class Broken(LengthLease):
        async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
            raise RuntimeError("the device thread died")

    async def body() -> None:
        store = await filled(MemoryBaselineStore(), 5)
        progress = await rebaseline(store, Broken(), RebaselineProgress())
        assert progress.state == "failed"
        assert progress.error == f"scoring with {NEW} failed: RuntimeError: the device thread died"

    asyncio.run(body())


def test_a_cancelled_pass_is_marked_failed() -> None:
    class Stuck(LengthLease):
        entered: asyncio.Event

        async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
            self.entered.set()
            await asyncio.Event().wait()
            raise AssertionError("never set")

    async def body() -> None:
        store = await filled(MemoryBaselineStore(), 5)
        lease = Stuck()
        lease.entered = asyncio.Event()
        progress = RebaselineProgress()
        task = asyncio.create_task(rebaseline(store, lease, progress))
        await lease.entered.wait()
        assert progress.state == "running"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (progress.state, progress.error) == ("failed", "cancelled")

    asyncio.run(body())


class RepeatingStore(MemoryBaselineStore):
    """Gives each page again with the next one, as SSCAN may while the index grows."""

    async def prompt_ids(self, cursor: str, count: int) -> tuple[str, list[str]]:
        following, ids = await super().prompt_ids(cursor, count)
        if cursor:
            _, before = await super().prompt_ids("", count)
            ids = before + ids
        return following, ids


def test_ids_given_twice_are_gone_through_once() -> None:
    async def body() -> None:
        store = await filled(RepeatingStore(), 20)
        lease = LengthLease()
        progress = await rebaseline(store, lease, RebaselineProgress(), prompts_per_batch=8)
        assert progress.state == "done"
        assert (progress.prompts_done, progress.prompts_total) == (20, 20)
        assert progress.prompts_cached_already == 0
        prompts = lease.scored_prompts()
        assert sorted(prompts) == sorted(f"prompt {i}" for i in range(20) for _ in responses(i))

    asyncio.run(body())


def test_the_metrics_count_outcomes_and_show_progress() -> None:
    async def body() -> None:
        metrics = Metrics()
        assert metric(metrics.render().decode(), "crs_rebaseline_progress") == 1.0  # none runs
        store = await filled(MemoryBaselineStore(), 10)
        await store.write([write(0, NEW, rewards=[1.0])])
        await store.write([write(1, responses=[TOO_LONG])])
        gauge: list[float] = []

        class Watching(LengthLease):
            async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
                text = metrics.render().decode()
                gauge.append(metric(text, "crs_rebaseline_progress") or 0.0)
                return await super().score(pairs)

        progress = await rebaseline(
            store, Watching(), RebaselineProgress(), prompts_per_batch=4, observer=metrics
        )
        assert progress.state == "done"
        text = metrics.render().decode()
        counted = {
            outcome: metric(text, "crs_rebaseline_prompts_total", {"outcome": outcome})
            for outcome in ("scored", "cached_already", "failed")
        }
        assert counted == {"scored": 8.0, "cached_already": 1.0, "failed": 1.0}
        assert metric(text, "crs_rebaseline_progress") == 1.0
        assert gauge[0] == 0.0  # the first page, its prompt 1 then one by one
        assert gauge[-1] == 0.8  # the last page of 2, after 8 of 10
        assert gauge == sorted(gauge)

    asyncio.run(body())


def test_progress_as_the_api_shows_it() -> None:
    progress = RebaselineProgress(prompts_total=10, prompts_done=4, responses_scored=9)
    shown = progress.as_dict()
    assert shown["state"] == "running"
    assert {k: shown[k] for k in ("prompts_total", "prompts_done", "responses_scored")} == {
        "prompts_total": 10,
        "prompts_done": 4,
        "responses_scored": 9,
    }
    assert set(shown) >= {"prompts_cached_already", "prompts_failed", "error", "finished_at"}
    assert progress.fraction == 0.4


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="prompts_per_batch"):
        asyncio.run(
            rebaseline(
                MemoryBaselineStore(), LengthLease(), RebaselineProgress(), prompts_per_batch=0
            )
        )


def test_the_memory_store_pages_through_every_prompt_a_delete_skips_none() -> None:
    async def body() -> None:
        store = await filled(MemoryBaselineStore(), 10)
        cursor, first = await store.prompt_ids("", 4)
        assert first == ["p000", "p001", "p002", "p003"]
        await store.delete("p001")  # behind the cursor: shifts nothing after it
        seen = list(first)
        while cursor:
            cursor, page = await store.prompt_ids(cursor, 4)
            assert len(page) <= 4
            seen += page
        assert seen == [f"p{i:03d}" for i in range(10)]
        assert await MemoryBaselineStore().prompt_ids("", 4) == ("", [])

    asyncio.run(body())
