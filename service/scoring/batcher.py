"""Cross-request dynamic batching.

PPO trainers send one sample per request as each rollout finishes. Every item of every request
enters one queue, kept sorted by length; batches are windows of that order around the oldest
waiting item, as large as the token budget allows counted with padding. The device runs one
batch while the next one waits ready behind it, so the device never waits for the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from service.scoring.types import Encoded

log = logging.getLogger("crs.batcher")

Forward = Callable[[Sequence[Encoded]], list[float]]
# One batch on the device plus one ready behind it.
MAX_BATCHES_IN_FLIGHT = 2


class Overloaded(RuntimeError):
    """The queue holds more tokens than allowed; come back after ``retry_after_s``."""

    def __init__(self, queued_tokens: int, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            f"the reward queue is full ({queued_tokens} tokens waiting); retry in {retry_after_s} s"
        )


class QueueTimeout(TimeoutError):
    """The items of a request were not scored within the request time limit."""


class BatchFailed(RuntimeError):
    """The forward pass of a batch holding some of this request's items failed."""


class BatchObserver(Protocol):
    """Where the batcher reports what it does (the service's metrics)."""

    def queue_changed(self, items: int, tokens: int) -> None: ...

    def batch_done(
        self, *, items: int, real_tokens: int, padded_tokens: int, forward_s: float
    ) -> None: ...

    def items_waited(self, seconds: Sequence[float]) -> None: ...

    def items_dropped(self, reason: str, count: int) -> None: ...


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's items: results fill in as their batches finish."""

    future: asyncio.Future[list[float]]
    rewards: list[float]
    remaining: int
    enqueued_at: float
    closed: bool = False


@dataclass(eq=False, slots=True)
class _Item:
    key: tuple[int, int]  # (length, arrival number): the queue order
    encoded: Encoded
    owner: _Request
    index: int
    queued: bool = True


@dataclass
class _Throughput:
    """A smoothed tokens-per-second figure, for Retry-After estimates."""

    tokens_per_s: float = 0.0
    smoothing: float = 0.2

    def record(self, tokens: int, seconds: float) -> None:
        if seconds > 0:
            rate = tokens / seconds
            old = self.tokens_per_s
            self.tokens_per_s = rate if old == 0 else old + self.smoothing * (rate - old)


@dataclass
class Batcher:
    """One queue and one device worker shared by every request to a model."""

    forward: Forward
    executor: Executor
    max_batch_tokens: int
    max_queue_tokens: int
    batch_wait_s: float
    observer: BatchObserver
    _sorted: list[_Item] = field(default_factory=list)
    _arrivals: deque[_Item] = field(default_factory=deque)
    _queued_tokens: int = 0
    _in_flight: int = 0
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _throughput: _Throughput = field(default_factory=_Throughput)

    def start(self) -> None:
        """Start the scheduling task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="crs-batcher")

    async def stop(self) -> None:
        """Stop scheduling and fail whatever still waits."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in list(self._sorted):
            self._fail(item.owner, BatchFailed("the service is shutting down"), "shutdown")

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    async def submit(self, encoded: Sequence[Encoded], timeout_s: float) -> list[float]:
        """Rewards of ``encoded`` in order, scored in batches shared with other requests."""
        if not encoded:
            return []
        tokens = sum(item.length for item in encoded)
        # An empty queue admits anything, so a single large request can never be locked out.
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
            raise Overloaded(self._queued_tokens, self._retry_after_s())
        loop = asyncio.get_running_loop()
        request = _Request(
            future=loop.create_future(),
            rewards=[math.nan] * len(encoded),
            remaining=len(encoded),
            enqueued_at=loop.time(),
        )
        self._enqueue(request, encoded)
        try:
            return await asyncio.wait_for(request.future, timeout_s)
        except TimeoutError:
            self._drop(request, "timeout")
            raise QueueTimeout(
                f"{request.remaining} of {len(encoded)} items not scored within {timeout_s} s"
            ) from None
        except asyncio.CancelledError:
            # The caller went away (client disconnected): its waiting items never run.
            self._drop(request, "cancelled")
            raise

    def _enqueue(self, request: _Request, encoded: Sequence[Encoded]) -> None:
        for index, item in enumerate(encoded):
            queued = _Item((item.length, next(self._numbers)), item, request, index)
            bisect.insort(self._sorted, queued, key=lambda it: it.key)
            self._arrivals.append(queued)
            self._queued_tokens += item.length
        self._queue_changed()
        self._wake.set()

    def _drop(self, request: _Request, reason: str) -> None:
        """Close a request and take its waiting items out of the queue."""
        if request.closed:
            return
        request.closed = True
        dropped = [item for item in self._sorted if item.owner is request]
        for item in dropped:
            self._unqueue(item)
        if dropped:
            self.observer.items_dropped(reason, len(dropped))
            self._queue_changed()
        self._wake.set()

    def _unqueue(self, item: _Item) -> None:
        position = bisect.bisect_left(self._sorted, item.key, key=lambda it: it.key)
        del self._sorted[position]
        item.queued = False
        self._queued_tokens -= item.encoded.length

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            delay = self._dispatch_ready(loop.time())
            if delay == 0.0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _dispatch_ready(self, now: float) -> float | None:
        """Send a batch to the device if one should go now: 0.0 after sending one, else how
        long to wait for more (None: until something happens)."""
        if not self._sorted or self._in_flight >= MAX_BATCHES_IN_FLIGHT:
            return None
        oldest = self._oldest()
        low, high, full = self._window(oldest)
        if not full:
            if self._in_flight:
                return None  # more items arrive while the device works: wait for them
            waited = now - oldest.owner.enqueued_at
            if waited < self.batch_wait_s:
                return self.batch_wait_s - waited
        self._dispatch(self._sorted[low:high], now)
        return 0.0

    def _oldest(self) -> _Item:
        while not self._arrivals[0].queued:
            self._arrivals.popleft()
        return self._arrivals[0]

    def _window(self, anchor: _Item) -> tuple[int, int, bool]:
        """The slice of the sorted queue around ``anchor`` that fits the budget with padding,
        and whether the budget (not the queue) ended it."""
        items, budget = self._sorted, self.max_batch_tokens
        low = bisect.bisect_left(items, anchor.key, key=lambda it: it.key)
        high = low + 1
        width = anchor.encoded.length
        # Shorter neighbours first: they fill the batch without widening it.
        while low > 0 and (high - low + 1) * width <= budget:
            low -= 1
        while high < len(items) and (high - low + 1) * items[high].encoded.length <= budget:
            high += 1
        full = low > 0 or high < len(items)
        return low, high, full

    def _dispatch(self, batch: list[_Item], now: float) -> None:
        for item in batch:
            self._unqueue(item)
        self._queue_changed()
        self.observer.items_waited([now - item.owner.enqueued_at for item in batch])
        self._in_flight += 1
        encoded = [item.encoded for item in batch]
        future = asyncio.get_running_loop().run_in_executor(
            self.executor, _timed, self.forward, encoded
        )
        future.add_done_callback(lambda done: self._finish(batch, done))

    def _finish(self, batch: list[_Item], done: asyncio.Future[tuple[list[float], float]]) -> None:
        self._in_flight -= 1
        self._wake.set()
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        if error is not None:
            log.error("a batch of %d items failed: %s", len(batch), error, exc_info=error)
            failure = BatchFailed(f"scoring failed: {type(error).__name__}: {error}")
            for owner in {item.owner for item in batch}:
                self._fail(owner, failure, "batch_failed")
            return
        rewards, seconds = done.result()
        lengths = [item.encoded.length for item in batch]
        self._throughput.record(sum(lengths), seconds)
        self.observer.batch_done(
            items=len(batch),
            real_tokens=sum(lengths),
            padded_tokens=len(batch) * max(lengths),
            forward_s=seconds,
        )
        for item, reward in zip(batch, rewards, strict=True):
            self._deliver(item, reward)

    def _deliver(self, item: _Item, reward: float) -> None:
        owner = item.owner
        if owner.closed:
            return  # timed out, cancelled or failed meanwhile: nobody waits for it
        owner.rewards[item.index] = reward
        owner.remaining -= 1
        if owner.remaining == 0:
            owner.closed = True
            owner.future.set_result(owner.rewards)

    def _fail(self, owner: _Request, error: Exception, reason: str) -> None:
        if owner.closed:
            return
        self._drop(owner, reason)
        owner.future.set_exception(error)

    def _queue_changed(self) -> None:
        self.observer.queue_changed(len(self._sorted), self._queued_tokens)

    def _retry_after_s(self) -> int:
        rate = self._throughput.tokens_per_s
        seconds = self._queued_tokens / rate if rate > 0 else 1.0
        return max(1, min(60, math.ceil(seconds)))


def _timed(forward: Forward, batch: Sequence[Encoded]) -> tuple[list[float], float]:
    """Run on the device thread: the forward and its duration."""
    started = time.perf_counter()
    rewards = forward(batch)
    return rewards, time.perf_counter() - started
