"""The cross-request batcher with a stand-in forward: merging, budgets, backpressure, time
limits, cancellation and failure isolation."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.scoring.batcher import (
    Batcher,
    BatchFailed,
    Overloaded,
    QueueTimeout,
    ServiceStopping,
)
from service.scoring.types import Encoded

POISON = 999


def encoded(length: int, tag: int = 1) -> Encoded:
    return Encoded(input_ids=[tag] * length, token_type_ids=None, truncated=False)


def reward_of(item: Encoded) -> float:
    """What the stand-in model answers: a function of the item alone."""
    return item.input_ids[0] * 1000.0 + item.length


class Observer:
    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.batches: list[tuple[int, int, int]] = []
        self.waits: list[float] = []
        self.queue: tuple[int, int] = (0, 0)

    def queue_changed(self, items: int, tokens: int) -> None:
        self.queue = (items, tokens)

    def batch_done(
        self, *, items: int, real_tokens: int, padded_tokens: int, forward_s: float
    ) -> None:
        self.batches.append((items, real_tokens, padded_tokens))

    def items_waited(self, seconds: Sequence[float]) -> None:
        self.waits.extend(seconds)

    def items_dropped(self, reason: str, count: int) -> None:
        self.dropped[reason] += count


class Model:
    """A forward that records its batches, can be held, and fails on a poison item."""

    def __init__(self) -> None:
        self.batches: list[list[Encoded]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.entered.set()
        self.gate.wait(timeout=10)
        self.batches.append(list(batch))
        if any(item.input_ids[0] == POISON for item in batch):
            raise RuntimeError("poisoned batch")
        return [reward_of(item) for item in batch]


@asynccontextmanager
async def running(
    model: Model,
    *,
    budget: int = 1000,
    queue: int = 100_000,
    wait_s: float = 0.002,
    workers: int = 1,
    worker_init: Callable[[], None] | None = None,
    min_efficiency: float = 0.0,
    observer: Observer | None = None,
    group_prefixes: bool = False,
    computed_tokens: Callable[[Sequence[Encoded]], int] | None = None,
) -> AsyncIterator[tuple[Batcher, Observer]]:
    observer = observer or Observer()
    batcher = Batcher(
        forward=model.forward,
        max_batch_tokens=budget,
        max_queue_tokens=queue,
        batch_wait_s=wait_s,
        observer=observer,
        min_efficiency=min_efficiency,
        workers=workers,
        worker_init=worker_init,
        group_prefixes=group_prefixes,
        computed_tokens=computed_tokens,
    )
    batcher.start()
    try:
        yield batcher, observer
    finally:
        model.gate.set()
        await batcher.stop()


async def hold_device(batcher: Batcher, model: Model) -> asyncio.Task[list[float]]:
    """Occupy the device with one held batch; returns the task that waits for it."""
    model.gate.clear()
    model.entered.clear()
    task = asyncio.ensure_future(batcher.submit([encoded(4, tag=7)], 10))
    await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 5)
    return task


def test_concurrent_requests_share_batches_and_get_their_own_rewards() -> None:
    async def body() -> None:
        model = Model()
        async with running(model, budget=4096) as (batcher, observer):
            held = await hold_device(batcher, model)
            requests = [[encoded(10 + i % 5, tag=i + 1)] for i in range(40)]
            tasks = [asyncio.ensure_future(batcher.submit(r, 10)) for r in requests]
            await asyncio.sleep(0.05)  # let all 40 arrive while the device is busy
            model.gate.set()
            results = await asyncio.gather(*tasks)
            await held
        assert results == [[reward_of(r[0])] for r in requests]
        # 40 single-item requests ran in far fewer forward passes than 40.
        assert len(model.batches) <= 4
        assert observer.dropped == Counter()

    asyncio.run(body())


@settings(deadline=None, max_examples=40)
@given(
    st.lists(st.lists(st.integers(1, 300), min_size=0, max_size=12), min_size=1, max_size=12),
    st.integers(64, 2048),
    st.integers(1, 3),
)
def test_every_request_gets_its_rewards_in_order_and_budgets_hold(
    requests: list[list[int]], budget: int, workers: int
) -> None:
    async def body() -> list[list[float]]:
        model = Model()
        async with running(model, budget=budget, workers=workers) as (batcher, _):
            submissions = [
                [encoded(length, tag=r * 100 + i + 1) for i, length in enumerate(lengths)]
                for r, lengths in enumerate(requests)
            ]
            got = await asyncio.gather(*(batcher.submit(s, 10) for s in submissions))
        for batch in model.batches:
            padded = len(batch) * max(item.length for item in batch)
            assert padded <= budget or len(batch) == 1
        assert got == [[reward_of(item) for item in s] for s in submissions]
        return got

    asyncio.run(body())


def test_over_the_queue_bound_is_refused_at_once_and_admitted_work_completes() -> None:
    async def body() -> None:
        model = Model()
        async with running(model, budget=64, queue=100) as (batcher, _):
            held = await hold_device(batcher, model)
            admitted = asyncio.ensure_future(batcher.submit([encoded(60), encoded(30)], 10))
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as refused:
                await batcher.submit([encoded(20)], 10)
            assert refused.value.retry_after_s >= 1
            assert batcher.queued_tokens == 90
            model.gate.set()
            assert await admitted == [reward_of(encoded(60)), reward_of(encoded(30))]
            await held

    asyncio.run(body())


def test_an_empty_queue_admits_a_request_larger_than_the_bound() -> None:
    async def body() -> None:
        async with running(Model(), budget=64, queue=10) as (batcher, _):
            assert await batcher.submit([encoded(50), encoded(50)], 10) == [1050.0, 1050.0]

    asyncio.run(body())


def test_timed_out_items_are_dropped_and_never_scored() -> None:
    async def body() -> None:
        model = Model()
        async with running(model) as (batcher, observer):
            held = await hold_device(batcher, model)
            with pytest.raises(QueueTimeout, match="1 of 1 items"):
                await batcher.submit([encoded(5, tag=42)], 0.05)
            model.gate.set()
            await held
            assert batcher.queued_tokens == 0
        assert observer.dropped == Counter({"timeout": 1})
        assert all(item.input_ids[0] != 42 for batch in model.batches for item in batch)

    asyncio.run(body())


def test_a_cancelled_request_never_reaches_the_model() -> None:
    async def body() -> None:
        model = Model()
        async with running(model) as (batcher, observer):
            held = await hold_device(batcher, model)
            gone = asyncio.ensure_future(batcher.submit([encoded(5, tag=43)] * 3, 10))
            stays = asyncio.ensure_future(batcher.submit([encoded(6, tag=44)], 10))
            await asyncio.sleep(0.01)
            gone.cancel()
            # Until the task has run its cancellation (several loop turns on Python 3.11).
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            model.gate.set()
            assert await stays == [44006.0]
            await held
        assert gone.cancelled()
        assert observer.dropped == Counter({"cancelled": 3})
        assert all(item.input_ids[0] != 43 for batch in model.batches for item in batch)

    asyncio.run(body())


def test_a_failed_batch_fails_only_its_requests() -> None:
    async def body() -> None:
        model = Model()
        # A 16-token budget puts each 10-token item in a batch of its own.
        async with running(model, budget=16) as (batcher, observer):
            held = await hold_device(batcher, model)
            poisoned = asyncio.ensure_future(
                batcher.submit([encoded(10, tag=POISON), encoded(10, tag=5)], 10)
            )
            healthy = asyncio.ensure_future(batcher.submit([encoded(10, tag=6)], 10))
            await asyncio.sleep(0.01)
            model.gate.set()
            with pytest.raises(BatchFailed, match="failed on an item") as failed:
                await poisoned
            assert "poisoned" not in str(failed.value)  # the log has it, the caller does not
            assert await healthy == [6010.0]
            await held
        assert observer.dropped["batch_failed"] <= 1  # its other item, if still queued

    asyncio.run(body())


def test_stop_fails_what_still_waits() -> None:
    async def body() -> None:
        model = Model()
        async with running(model) as (batcher, _):
            held = await hold_device(batcher, model)
            waiting = asyncio.ensure_future(batcher.submit([encoded(5)], 10))
            await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(batcher.stop())
            with pytest.raises(ServiceStopping, match="shutting down"):
                await waiting
            model.gate.set()  # the batch already on the device finishes
            await stopping
            assert await held == [7004.0]
            with pytest.raises(ServiceStopping, match="shutting down"):
                await batcher.submit([encoded(5)], 10)

    asyncio.run(body())


def test_device_threads_run_batches_side_by_side() -> None:
    """Two device threads: the second batch starts while the first is still running (each
    forward waits for the other at a barrier, which one thread alone could never pass)."""
    barrier = threading.Barrier(2, timeout=5)
    initialised: list[str] = []

    class SideBySide(Model):
        def forward(self, batch: Sequence[Encoded]) -> list[float]:
            barrier.wait()
            return super().forward(batch)

    def init() -> None:
        initialised.append(threading.current_thread().name)

    async def body() -> None:
        model = SideBySide()
        async with running(model, budget=16, workers=2, worker_init=init) as (batcher, _):
            first, second = [encoded(10, tag=1)], [encoded(10, tag=2)]
            got = await asyncio.gather(batcher.submit(first, 10), batcher.submit(second, 10))
        assert got == [[reward_of(first[0])], [reward_of(second[0])]]
        assert len(model.batches) == 2
        assert sorted(initialised) == ["crs-device-0", "crs-device-1"]

    asyncio.run(body())


def test_the_window_is_chosen_on_its_whole_padded_cost_with_the_production_defaults() -> None:
    """min_efficiency=0.9 and max_batch_tokens=16384 (the settings' defaults): a 300-token item
    is the oldest, 21 items of 500 tokens wait beside it. The 22 together compute at 98%
    efficiency; the first step alone (300 + 500 padded to 1000) is at 80%. The old window
    tested each step alone and ran the 300-token item as a batch of 1."""

    async def body() -> None:
        model = Model()
        async with running(model, budget=16384, min_efficiency=0.9) as (batcher, _):
            held = await hold_device(batcher, model)
            oldest = asyncio.ensure_future(batcher.submit([encoded(300, tag=2)], 10))
            await asyncio.sleep(0)  # it arrives first
            rest = [
                asyncio.ensure_future(batcher.submit([encoded(500, tag=3 + i)], 10))
                for i in range(21)
            ]
            while batcher.queued_tokens < 300 + 21 * 500:
                await asyncio.sleep(0)
            model.gate.set()
            await asyncio.gather(held, oldest, *rest)
        first = model.batches[1]
        assert len(first) == 22
        assert sum(item.length for item in first) / (22 * 500) >= 0.98

    asyncio.run(body())


@settings(deadline=None, max_examples=30)
@given(
    st.lists(st.integers(1, 400), min_size=1, max_size=40),
    st.floats(0.0, 1.0),
    st.integers(64, 4096),
)
def test_every_batch_keeps_the_efficiency_floor_unless_alone(
    lengths: list[int], min_efficiency: float, budget: int
) -> None:
    async def body() -> None:
        model = Model()
        async with running(model, budget=budget, min_efficiency=min_efficiency) as (batcher, _):
            held = await hold_device(batcher, model)
            tasks = [
                asyncio.ensure_future(batcher.submit([encoded(n, tag=i + 10)], 10))
                for i, n in enumerate(lengths)
            ]
            while batcher.queued_tokens < sum(lengths):
                await asyncio.sleep(0)
            model.gate.set()
            await asyncio.gather(held, *tasks)
        for batch in model.batches:
            real = sum(item.length for item in batch)
            padded = len(batch) * max(item.length for item in batch)
            assert len(batch) == 1 or (real / padded >= min_efficiency and padded <= budget)

    asyncio.run(body())


async def until_queued(batcher: Batcher, tokens: int) -> None:
    """Let the loop run until ``tokens`` are queued (the submissions have all arrived)."""
    for _ in range(10_000):
        if batcher.queued_tokens == tokens:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{batcher.queued_tokens} tokens queued, not {tokens}")


@pytest.mark.parametrize(("workers", "sizes"), [(1, [8]), (2, [1, 1, 2, 4])])
def test_device_threads_share_a_burst(workers: int, sizes: list[int]) -> None:
    """Eight items that fit one batch arrive while every device thread is busy: one thread
    takes them all, two take their share of what waits each time (4 of 8, 2 of 4, ...), so
    the burst ends on both at about the same time."""

    async def body() -> list[int]:
        model = Model()
        async with running(model, budget=4096, workers=workers) as (batcher, _):
            held = [await hold_device(batcher, model) for _ in range(workers)]
            assert batcher.queued_tokens == 0  # each held item is on a thread of its own
            burst = [[encoded(10, tag=100 + i)] for i in range(8)]
            tasks = [asyncio.ensure_future(batcher.submit(r, 10)) for r in burst]
            await until_queued(batcher, 80)
            model.gate.set()
            assert await asyncio.gather(*tasks) == [[reward_of(r[0])] for r in burst]
            await asyncio.gather(*held)
        return sorted(len(b) for b in model.batches if b[0].input_ids[0] != 7)

    assert asyncio.run(body()) == sizes


def test_metrics_count_what_the_forward_computes() -> None:
    """The model says what a batch computed (runs of similar length, prompts once); a count
    that fails costs that figure, never the batch."""

    def one_more(batch: Sequence[Encoded]) -> int:
        return sum(item.length for item in batch) + 1

    def broken(batch: Sequence[Encoded]) -> int:
        raise RuntimeError("cannot count")

    async def body(count: Callable[[Sequence[Encoded]], int]) -> list[tuple[int, int, int]]:
        model = Model()
        async with running(model, computed_tokens=count) as (batcher, observer):
            items = [encoded(3, tag=2), encoded(5, tag=3)]
            assert await batcher.submit(items, 10) == [reward_of(item) for item in items]
        return observer.batches

    counted = asyncio.run(body(one_more))
    assert counted
    assert all(padded == real + 1 for _, real, padded in counted)
    fallback = asyncio.run(body(broken))
    assert sum(items for items, _, _ in fallback) == 2
    # Counted padded: both items to 5 tokens, or one alone unpadded.
    assert all(padded == (10 if items == 2 else real) for items, real, padded in fallback)
