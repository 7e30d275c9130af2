"""The batcher under faults: no exception ends a device thread, a dead thread is visible and
fails what waits at once, a failed batch is retried by halves, a cancelled request never costs
its batch mates their rewards (Python 3.12's ``Task.cancel()`` included)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from service.scoring.batcher import (
    BatchFailed,
    DeviceHealth,
    DeviceThreadsDead,
    ScoringUnavailable,
)
from service.scoring.types import Encoded
from tests.unit.test_batcher import (
    POISON,
    Model,
    Observer,
    encoded,
    hold_device,
    reward_of,
    running,
)

# A request's limit when a test's failure would otherwise be a wait for it: the old code's
# failure shows as QueueTimeout after this, never as a hang.
LIMIT_S = 5.0


class EmptySafeModel(Model):
    """Answers the length for any item, empty ones included (the stand-in needs a first id)."""

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.entered.set()
        self.gate.wait(timeout=10)
        self.batches.append(list(batch))
        return [float(item.length) for item in batch]


def test_empty_encodings_neither_divide_by_zero_nor_end_the_device_thread() -> None:
    """Two zero-length items make a window of zero padded tokens: the old efficiency divided
    by zero on the device thread, outside its try, and every later request timed out."""

    async def body() -> None:
        async with running(EmptySafeModel()) as (batcher, _):
            assert await batcher.submit([encoded(0), encoded(0)], LIMIT_S) == [0.0, 0.0]
            assert await batcher.submit([encoded(3)], LIMIT_S) == [3.0]
            assert batcher.device_health == DeviceHealth(started=1, alive=1, died=0)

    asyncio.run(body())


class FailingObserver(Observer):
    """Metrics that fail wherever the device thread reports to them."""

    def batch_done(self, **kwargs: Any) -> None:
        raise RuntimeError("metrics backend gone")

    def items_waited(self, seconds: Sequence[float]) -> None:
        raise RuntimeError("metrics backend gone")


def test_a_failing_observer_costs_neither_a_batch_nor_the_device_thread() -> None:
    """The old loop called the observer outside its try: the batch's rewards were lost and the
    thread ended."""

    async def body() -> None:
        async with running(Model(), observer=FailingObserver()) as (batcher, _):
            assert await batcher.submit([encoded(4, tag=2)], LIMIT_S) == [2004.0]
            assert await batcher.submit([encoded(5, tag=3)], LIMIT_S) == [3005.0]
            assert batcher.device_health.alive == 1

    asyncio.run(body())


def test_a_fault_forming_a_batch_fails_only_the_request_it_was_formed_around() -> None:
    """Forming a window around one request's item raises (a batcher fault, injected): that
    request fails, the thread lives on and serves the next one."""

    async def body() -> None:
        async with running(Model()) as (batcher, _):
            window = batcher._window

            def faulty_window(anchor: Any, max_items: int) -> Any:
                if anchor.encoded.input_ids[0] == POISON:
                    raise ValueError("injected fault")
                return window(anchor, max_items)

            batcher._window = faulty_window  # type: ignore[method-assign]
            with pytest.raises(BatchFailed, match="incident"):
                await batcher.submit([encoded(4, tag=POISON)], LIMIT_S)
            assert await batcher.submit([encoded(4, tag=2)], LIMIT_S) == [2004.0]
            assert batcher.device_health == DeviceHealth(started=1, alive=1, died=0)

    asyncio.run(body())


def test_a_thread_whose_init_fails_is_counted_dead_and_requests_fail_at_once() -> None:
    """The only device thread dies in worker_init: waiting and later requests fail with a
    503-class error at once (they waited for their time limit before, and nothing said why)."""

    def init() -> None:
        raise RuntimeError("cannot bind cores")

    async def body() -> None:
        async with running(Model(), worker_init=init) as (batcher, observer):
            # Queued before the thread died or refused after: either way, at once.
            with pytest.raises(DeviceThreadsDead, match="1 of 1 device threads died"):
                await batcher.submit([encoded(4)], 60)
            assert batcher.device_health == DeviceHealth(started=1, alive=0, died=1)
            assert batcher.device_health.all_dead
            with pytest.raises(DeviceThreadsDead):
                await batcher.submit([encoded(4)], 60)
        assert issubclass(DeviceThreadsDead, ScoringUnavailable)

    asyncio.run(body())


def test_one_dead_thread_of_two_is_counted_and_the_other_serves() -> None:
    lock = threading.Lock()
    inits: list[str] = []

    def init() -> None:
        with lock:
            inits.append(threading.current_thread().name)
            if len(inits) == 1:
                raise RuntimeError("cannot bind cores")

    async def body() -> None:
        async with running(Model(), workers=2, worker_init=init) as (batcher, _):
            assert await batcher.submit([encoded(4, tag=2)], LIMIT_S) == [2004.0]
            while len(inits) < 2:  # both threads have run their init
                await asyncio.sleep(0.001)
            health = batcher.device_health
            assert (health.started, health.died) == (2, 1)
            assert not health.all_dead

    asyncio.run(body())


class DeviceLost(BaseException):
    """Not an ``Exception``: it ends the device thread whatever the batcher catches."""


class LosingModel(Model):
    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.entered.set()
        self.gate.wait(timeout=10)
        raise DeviceLost


def test_a_thread_killed_by_a_base_exception_fails_its_batch_and_the_queue_at_once() -> None:
    async def body() -> None:
        model = LosingModel()
        async with running(model) as (batcher, _):
            held = await hold_device(batcher, model)
            waiting = asyncio.ensure_future(batcher.submit([encoded(5)], 60))
            while not batcher.queued_tokens:
                await asyncio.sleep(0)
            model.gate.set()
            with pytest.raises(DeviceThreadsDead):
                await held
            with pytest.raises(DeviceThreadsDead):
                await waiting
            assert batcher.device_health.all_dead

    asyncio.run(body())


def test_a_poisoned_item_fails_only_its_own_request_and_the_caller_reads_nothing_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Eight one-item requests share a batch; one item makes every forward holding it fail.
    Retried by halves, only that request fails (the old batcher failed all eight), its message
    names no internals (the exception text is in the log), and the halving stops at the item:
    8, 4, 2, 1 items, four failed forwards."""

    async def body() -> None:
        model = Model()
        async with running(model, budget=4096) as (batcher, _):
            held = await hold_device(batcher, model)
            items = [encoded(10, tag=POISON if i == 5 else i + 1) for i in range(8)]
            tasks = [asyncio.ensure_future(batcher.submit([item], LIMIT_S)) for item in items]
            while batcher.queued_tokens < 80:
                await asyncio.sleep(0)
            model.gate.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await held
        failed = results.pop(5)
        assert isinstance(failed, BatchFailed)
        assert not isinstance(failed, ScoringUnavailable)  # the request's own item: a 500
        assert "poisoned" not in str(failed)
        assert results == [[reward_of(item)] for i, item in enumerate(items) if i != 5]
        holding_poison = [b for b in model.batches if any(e.input_ids[0] == POISON for e in b)]
        assert [len(b) for b in holding_poison] == [8, 4, 2, 1]
        assert "poisoned batch" in caplog.text

    with caplog.at_level(logging.ERROR, logger="crs.batcher"):
        asyncio.run(body())


class BrokenDevice(Model):
    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.entered.set()
        self.gate.wait(timeout=10)
        self.batches.append(list(batch))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_device_failing_everything_is_retried_a_bounded_number_of_times() -> None:
    """64 items in one batch on a device that fails every forward: at most 2 * bit_length(64)
    = 14 forwards, then every request fails; the thread lives on."""

    async def body() -> None:
        model = BrokenDevice()
        async with running(model, budget=4096) as (batcher, _):
            held = await hold_device(batcher, model)
            tasks = [
                asyncio.ensure_future(batcher.submit([encoded(10, tag=i + 1)], LIMIT_S))
                for i in range(64)
            ]
            while batcher.queued_tokens < 640:
                await asyncio.sleep(0)
            model.gate.set()
            results = await asyncio.gather(held, *tasks, return_exceptions=True)
            assert batcher.device_health.alive == 1
        assert all(isinstance(r, BatchFailed) for r in results)
        assert len(model.batches[1]) == 64
        assert len(model.batches) - 1 <= 14


C_TAG = 77


class SignallingModel(Model):
    """Holds any batch with a C_TAG item at its own gate, and says when it got there."""

    def __init__(self) -> None:
        super().__init__()
        self.c_gate = threading.Event()
        self.c_entered = threading.Event()

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        if any(item.input_ids[0] == C_TAG for item in batch):
            self.c_entered.set()
            self.c_gate.wait(timeout=10)
        return super().forward(batch)


@pytest.mark.parametrize("cancelled_item_fails", [False, True])
def test_a_request_cancelled_after_its_batch_finished_costs_its_mates_nothing(
    cancelled_item_fails: bool,
) -> None:
    """The interleaving of Python 3.12: A and B share a batch; the device finishes it and
    queues the hand-over on the loop; only then is A's task cancelled, which (3.12) cancels
    A's future at once, before A's task runs its clean-up. The hand-over then met a done
    future: the old code raised InvalidStateError in the loop's callback and B never got its
    reward (it timed out). The device is known to have queued the hand-over when it enters
    the next batch (C), which the test waits for with the loop blocked, so nothing else runs
    in between. Python 3.11's wait_for cancels A's future only later, so there it passed."""
    loop_errors: list[dict[str, Any]] = []

    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        model = SignallingModel()
        async with running(model, budget=16) as (batcher, _):
            held = await hold_device(batcher, model)
            a_item = encoded(5, tag=POISON if cancelled_item_fails else 20)
            a = asyncio.ensure_future(batcher.submit([a_item], 10))
            b = asyncio.ensure_future(batcher.submit([encoded(5, tag=21)], LIMIT_S))
            c = asyncio.ensure_future(batcher.submit([encoded(12, tag=C_TAG)], 10))
            while batcher.queued_tokens < 22:
                await asyncio.sleep(0)
            model.gate.set()
            # Blocking the loop on purpose: the device thread needs no loop to get to C.
            assert model.c_entered.wait(timeout=10)
            a.cancel()
            assert await b == [reward_of(encoded(5, tag=21))]
            model.c_gate.set()
            assert await c == [reward_of(encoded(12, tag=C_TAG))]
            await held
            # 3.12: cancelled; 3.11's wait_for hands over a result that came in meanwhile.
            (outcome,) = await asyncio.gather(a, return_exceptions=True)
            assert isinstance(outcome, asyncio.CancelledError | BatchFailed | list)
        assert [len(batch) for batch in model.batches[1:2]] == [2]

    asyncio.run(body())
    assert loop_errors == []


class ShortModel(Model):
    """Answers one reward too few for any batch holding a POISON item."""

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        return super().forward([e for e in batch if e.input_ids[0] != POISON])


def test_a_forward_answering_the_wrong_number_of_rewards_fails_only_that_item() -> None:
    """The old hand-over zipped strictly on the loop: the callback raised and every request
    of the batch waited for its time limit."""

    async def body() -> None:
        model = ShortModel()
        async with running(model, budget=4096) as (batcher, _):
            held = await hold_device(batcher, model)
            bad = asyncio.ensure_future(batcher.submit([encoded(10, tag=POISON)], LIMIT_S))
            good = asyncio.ensure_future(batcher.submit([encoded(10, tag=3)], LIMIT_S))
            while batcher.queued_tokens < 20:
                await asyncio.sleep(0)
            model.gate.set()
            with pytest.raises(BatchFailed):
                await bad
            assert await good == [3010.0]
            await held

    asyncio.run(body())


def test_a_fault_beyond_repair_resets_the_queue_and_the_thread_goes_on() -> None:
    """Forming a batch fails and so does the repair (both injected): the waiting requests
    fail, the thread lives and serves the next request."""

    async def body() -> None:
        async with running(Model()) as (batcher, _):
            window, broken = batcher._window, [True]

            def faulty(anchor: Any, max_items: int) -> Any:
                if broken[0]:
                    raise ValueError("injected fault")
                return window(anchor, max_items)

            def failing_repair(error: Exception) -> None:
                broken[0] = False
                raise ValueError("injected repair fault")

            batcher._window = faulty  # type: ignore[method-assign]
            batcher._evict_oldest = failing_repair  # type: ignore[method-assign]
            with pytest.raises(BatchFailed, match="incident"):
                await batcher.submit([encoded(4, tag=2)], LIMIT_S)
            assert batcher.queued_tokens == 0
            assert await batcher.submit([encoded(4, tag=3)], LIMIT_S) == [3004.0]
            assert batcher.device_health == DeviceHealth(started=1, alive=1, died=0)

    asyncio.run(body())
