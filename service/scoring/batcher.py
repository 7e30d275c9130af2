"""Cross-request dynamic batching.

PPO trainers send one sample per request as each rollout finishes. Every item of every request
enters one queue, kept sorted by length. A device thread takes its next batch the moment it
finishes the last one, with no trip through the event loop: a window of the sorted queue around
the oldest waiting item, grown on the side that wastes less padding, as large as the token
budget allows counted with padding. So the device never waits for the event loop, and every
batch is formed from everything that arrived while the previous one ran. A GPU has one device
thread; a CPU may have several, each running its own batches on its share of the cores, and
then a window holds at most its thread's share of the queue's items, so that a burst ends on
all threads at about the same time.

When the model runs a prompt shared by several items once (``group_prefixes``), a batch is
formed around the oldest item's prompt instead, if more of its items wait: all of them, then
the other prompts with two or more items waiting, nearest in prompt length first (a batch's
prompts are padded to its longest), each prompt counted once in the budget
(``service/scoring/grouping.py``). A lone item still gets the length-sorted window.

No exception ends a device thread: a failed forward is retried by halves, so only the requests
of the items that fail again fail, and a fault in forming a batch fails only the request it was
formed around. A thread that dies anyway (its ``worker_init`` failed, or a ``BaseException``) is
counted in ``device_health``; once none is left, every waiting and later request fails at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.scoring.grouping import GroupedCost, shared_tokens
from service.scoring.types import Encoded

log = logging.getLogger("crs.batcher")

Forward = Callable[[Sequence[Encoded]], list[float]]


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
    """The forward pass of some of this request's items failed (the log has why)."""


class ScoringUnavailable(BatchFailed):
    """Scoring cannot run on this replica now, through no fault of the request: another
    replica (or this one, restarted) can serve it."""


class ServiceStopping(ScoringUnavailable):
    """The service is shutting down: the request was not (fully) scored."""

    def __init__(self) -> None:
        super().__init__("the service is shutting down; retry on another replica")


class DeviceThreadsDead(ScoringUnavailable):
    """A device thread died (with this request's batch, or the last one): only a restart of
    the process brings it back."""

    def __init__(self, died: int, started: int) -> None:
        super().__init__(f"{died} of {started} device threads died; this replica needs a restart")


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """How many device threads were started, are alive, and ended other than by ``stop()``."""

    started: int
    alive: int
    died: int

    @property
    def all_dead(self) -> bool:
        """Threads were started, some died, and none is left to score."""
        return self.died > 0 and self.alive == 0


class BatchObserver(Protocol):
    """Where the batcher reports what it does (the service's metrics); called from any thread."""

    def queue_changed(self, items: int, tokens: int) -> None: ...

    def batch_done(
        self, *, items: int, real_tokens: int, padded_tokens: int, forward_s: float
    ) -> None: ...

    def items_waited(self, seconds: Sequence[float]) -> None: ...

    def items_dropped(self, reason: str, count: int) -> None: ...


@dataclass(eq=False, slots=True)
class _Request:
    """One caller's items; touched only on the event loop."""

    future: asyncio.Future[list[float]]
    rewards: list[float]
    remaining: int
    enqueued_at: float  # time.monotonic()
    closed: bool = False


@dataclass(eq=False, slots=True)
class _Item:
    key: tuple[int, int]  # (length, arrival number): the queue order
    encoded: Encoded
    owner: _Request
    index: int
    queued: bool = True


@dataclass(slots=True)
class _Window:
    """A candidate batch: the slice [low, high) of the sorted queue."""

    low: int
    high: int
    real: int  # tokens of the items themselves
    width: int  # the longest item, which every row is padded to
    budget_full: bool = False

    @property
    def padded(self) -> int:
        return (self.high - self.low) * self.width

    @property
    def efficiency(self) -> float:
        # Zero-length items pad nothing; the formatter refuses them, but the batcher must not
        # divide by zero on its device thread if one slips through.
        padded = self.padded
        return self.real / padded if padded else 1.0

    def grown(self, item: _Item, *, below: bool) -> _Window:
        length = item.encoded.length
        return _Window(
            self.low - 1 if below else self.low,
            self.high if below else self.high + 1,
            real=self.real + length,
            width=max(self.width, length),
        )


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
    """One queue and its device threads (``workers``, usually one) shared by every request.

    The queue is shared between the event loop (which adds and withdraws items) and the device
    threads (which take batches), under one lock; requests and their futures belong to the loop.
    ``worker_init`` runs first on each device thread (the model binds its CPU threads there).
    """

    forward: Forward
    max_batch_tokens: int
    max_queue_tokens: int
    batch_wait_s: float
    observer: BatchObserver
    min_efficiency: float = 0.0
    workers: int = 1
    worker_init: Callable[[], None] | None = None
    # The forward runs a prompt shared by several items once (RewardModel.prefix_reuse): a
    # batch is then formed around the oldest item's prompt group (see _grouped_batch).
    group_prefixes: bool = False
    # The tokens a batch's forward computes, padding included (RewardModel.computed_tokens:
    # in runs, or with prompts once); without it, every item padded to the longest.
    computed_tokens: Callable[[Sequence[Encoded]], int] | None = None
    _sorted: list[_Item] = field(default_factory=list)
    # prefix_key -> its queued items by arrival number (only with group_prefixes).
    _by_prefix: dict[str, dict[int, _Item]] = field(default_factory=dict)
    _arrivals: deque[_Item] = field(default_factory=deque)
    _queued_tokens: int = 0
    _arrival_number: int = 0
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _threads: list[threading.Thread] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _throughput: _Throughput = field(default_factory=_Throughput)
    _alive: int = 0
    _died: int = 0

    def start(self) -> None:
        """Start the device threads; results come back to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(target=self._run_device, name=f"crs-device-{n}", daemon=True)
            for n in range(self.workers)
        ]
        with self._changed:
            self._alive = len(self._threads)
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        """Stop taking batches and fail whatever still waits."""
        with self._changed:
            self._stopping = True
            waiting = {item.owner for item in self._sorted}
            self._changed.notify_all()
        for owner in waiting:
            self._fail(owner, ServiceStopping(), "shutdown")
        for thread in self._threads:
            # A forward in progress finishes on its own; do not hold the loop for it.
            await asyncio.to_thread(thread.join, 30)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def device_health(self) -> DeviceHealth:
        """The device threads: started, alive, and died (ended other than by ``stop()``)."""
        with self._changed:
            return DeviceHealth(started=len(self._threads), alive=self._alive, died=self._died)

    async def submit(self, encoded: Sequence[Encoded], timeout_s: float) -> list[float]:
        """Rewards of ``encoded`` in order, scored in batches shared with other requests."""
        if not encoded:
            return []
        if self._stopping:
            raise ServiceStopping()
        if self._died and not self._alive:
            raise DeviceThreadsDead(self._died, len(self._threads))
        tokens = sum(item.length for item in encoded)
        # An empty queue admits anything, so a single large request can never be locked out.
        if self._queued_tokens and self._queued_tokens + tokens > self.max_queue_tokens:
            raise Overloaded(self._queued_tokens, self._retry_after_s())
        request = _Request(
            future=asyncio.get_running_loop().create_future(),
            rewards=[math.nan] * len(encoded),
            remaining=len(encoded),
            enqueued_at=time.monotonic(),
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

    # --- the event loop's side -------------------------------------------------------------

    def _enqueue(self, request: _Request, encoded: Sequence[Encoded]) -> None:
        with self._changed:
            for index, item in enumerate(encoded):
                self._arrival_number += 1
                queued = _Item((item.length, self._arrival_number), item, request, index)
                bisect.insort(self._sorted, queued, key=_key)
                self._arrivals.append(queued)
                if self.group_prefixes and item.prefix_key is not None:
                    self._by_prefix.setdefault(item.prefix_key, {})[queued.key[1]] = queued
                self._queued_tokens += item.length
            self._queue_changed()
            self._changed.notify_all()

    def _drop(self, request: _Request, reason: str) -> None:
        """Close a request and take its waiting items out of the queue."""
        if request.closed:
            return
        request.closed = True
        with self._changed:
            dropped = [item for item in self._sorted if item.owner is request]
            for item in dropped:
                self._unqueue(item)
            if dropped:
                self._queue_changed()
        if dropped:
            _observe(self.observer.items_dropped, reason, len(dropped))

    def _finish(
        self, batch: list[_Item], rewards: Sequence[float | None], failure: BatchFailed | None
    ) -> None:
        """Back on the loop: hand each reward to its request; a request with an item that
        could not be scored (None) fails with ``failure``, every other one gets its rewards."""
        for item, reward in zip(batch, rewards, strict=True):
            if reward is None:
                self._fail(item.owner, failure or _scoring_failed("unknown"), "batch_failed")
        for item, reward in zip(batch, rewards, strict=True):
            owner = item.owner
            if reward is None or self._settled(owner):
                continue  # timed out, cancelled or failed meanwhile: nobody waits for it
            owner.rewards[item.index] = reward
            owner.remaining -= 1
            if owner.remaining == 0:
                owner.closed = True
                owner.future.set_result(owner.rewards)

    def _settled(self, owner: _Request) -> bool:
        """Whether nobody waits for this request's rewards any more.

        Python 3.12's ``Task.cancel()`` cancels the future itself at once, while the task only
        runs ``_drop`` on a later turn of the loop: a done future is a closed request already.
        """
        if not owner.closed and owner.future.done():
            self._drop(owner, "cancelled")
        return owner.closed

    def _fail(self, owner: _Request, error: Exception, reason: str) -> None:
        if self._settled(owner):
            return
        self._drop(owner, reason)
        owner.future.set_exception(error)

    def _fail_waiting(self, error: Exception, reason: str) -> None:
        """Fail every request with an item still in the queue (on the loop)."""
        with self._changed:
            waiting = {item.owner for item in self._sorted}
        for owner in waiting:
            self._fail(owner, error, reason)

    # --- the device thread's side ----------------------------------------------------------

    def _run_device(self) -> None:
        batch: list[_Item] | None = None
        ended_by_stop = False
        try:
            if self.worker_init is not None:
                self.worker_init()
            while (batch := self._next_batch_or_reset()) is not None:
                self._run_batch(batch)
                batch = None
            ended_by_stop = True
        except BaseException as exc:
            # Only a BaseException or a failed worker_init gets here: the thread is lost.
            log.critical("device thread %s died", threading.current_thread().name, exc_info=exc)
            if batch:
                lost = DeviceThreadsDead(self._died + 1, len(self._threads))
                self._to_loop(self._finish, batch, [None] * len(batch), lost)
        finally:
            self._thread_ended(ended_by_stop)

    def _thread_ended(self, ended_by_stop: bool) -> None:
        with self._changed:
            self._alive -= 1
            if not ended_by_stop:
                self._died += 1
            last_gone = not self._alive and self._died and not self._stopping
            error = DeviceThreadsDead(self._died, len(self._threads))
        if last_gone:
            # Nobody is left to take the queue: fail it now rather than at each time limit.
            self._to_loop(self._fail_waiting, error, "devices_dead")

    def _run_batch(self, batch: list[_Item]) -> None:
        """Score one batch and hand the rewards to the loop; never raises an ``Exception``."""
        try:
            started = time.perf_counter()
            rewards, failure = self._forward_by_halves(batch)
            if None not in rewards:  # the throughput of a batch that ran as one
                self._record(batch, time.perf_counter() - started)
        except Exception as exc:  # a fault of the batcher itself: fail this batch only
            incident = uuid.uuid4().hex[:12]
            log.error("batch of %d items failed (incident %s)", len(batch), incident, exc_info=exc)
            rewards, failure = [None] * len(batch), _scoring_failed(incident)
        self._to_loop(self._finish, batch, rewards, failure)

    def _forward_by_halves(
        self, batch: list[_Item]
    ) -> tuple[list[float | None], BatchFailed | None]:
        """The batch's rewards, and the failure of those that are None (None when no forward
        failed); a failed forward is retried by halves so that only the items failing alone
        get None. At most ``2 * bit_length(len(batch))`` forwards may fail (enough
        to isolate two culprits; a device that fails everything fails the rest at once)."""
        rewards: list[float | None] = [None] * len(batch)
        failures_left = 2 * len(batch).bit_length()
        incident: str | None = None  # named at the first failure (uuid4 reads the OS's random)
        pending = [(0, len(batch))]
        while pending:
            low, high = pending.pop()
            try:
                got = self.forward([item.encoded for item in batch[low:high]])
                if len(got) != high - low:
                    raise ValueError(f"{len(got)} rewards for {high - low} items")
            except Exception as exc:
                failures_left -= 1
                incident = incident or uuid.uuid4().hex[:12]
                log.error(
                    "a forward of %d items failed (incident %s)",
                    high - low,
                    incident,
                    exc_info=exc,
                )
                if high - low > 1 and failures_left > 0:
                    middle = (low + high) // 2
                    pending += [(middle, high), (low, middle)]
                continue
            rewards[low:high] = got
        return rewards, None if incident is None else _scoring_failed(incident)

    def _next_batch_or_reset(self) -> list[_Item] | None:
        """The next batch; should forming one fail beyond ``_evict_oldest``'s repair, every
        waiting request fails and the queue starts afresh, so the thread can go on."""
        while True:
            try:
                return self._next_batch()
            except Exception as exc:
                incident = uuid.uuid4().hex[:12]
                log.error("the queue was reset (incident %s)", incident, exc_info=exc)
                with self._changed:
                    owners = {item.owner for item in self._sorted}
                    for item in self._sorted:
                        item.queued = False
                    self._sorted.clear()
                    self._arrivals.clear()
                    self._by_prefix.clear()
                    self._queued_tokens = 0
                    self._queue_changed()
                for owner in owners:
                    self._to_loop(self._fail, owner, _scoring_failed(incident), "batch_failed")

    def _next_batch(self) -> list[_Item] | None:
        """Block until a batch should run (None once stopping), and take it off the queue."""
        with self._changed:
            while not self._stopping:
                try:
                    wait = self._take_or_wait(time.monotonic())
                except Exception as exc:
                    self._evict_oldest(exc)
                    continue
                if isinstance(wait, list):
                    return wait
                self._changed.wait(wait)
        return None

    def _evict_oldest(self, error: Exception) -> None:
        """Forming a batch around the oldest item failed: fail that item's request, so the
        queue moves on instead of failing the same way for ever (under the lock)."""
        incident = uuid.uuid4().hex[:12]
        log.error("forming a batch failed (incident %s)", incident, exc_info=error)
        try:
            owners = {self._oldest().owner}
        except IndexError:  # the queue's order itself is broken: start it afresh
            owners = {item.owner for item in self._sorted}
        for item in [item for item in self._sorted if item.owner in owners]:
            self._unqueue(item)
        self._arrivals = deque(item for item in self._arrivals if item.queued)
        self._queue_changed()
        for owner in owners:
            self._to_loop(self._fail, owner, _scoring_failed(incident), "batch_failed")

    def _take_or_wait(self, now: float) -> list[_Item] | float | None:
        """A batch to run now, or how long to wait for more items (None: until notified)."""
        if not self._sorted:
            return None
        oldest = self._oldest()
        # Several device threads share what waits: a batch takes at most its thread's share
        # of the queue's items (a window) or prompt groups (a grouped batch), so a burst ends
        # on all of them at about the same time.
        share = -(-len(self._sorted) // self.workers)
        batch, budget_full = self._grouped_batch(oldest) or self._windowed_batch(oldest, share)
        if len(batch) == len(self._sorted) and not budget_full:
            # A small batch waits a moment for company, from its oldest item's arrival.
            waited = now - oldest.owner.enqueued_at
            if waited < self.batch_wait_s:
                return self.batch_wait_s - waited
        for item in batch:
            self._unqueue(item)
        self._queue_changed()
        _observe(self.observer.items_waited, [now - item.owner.enqueued_at for item in batch])
        return batch

    def _windowed_batch(self, anchor: _Item, max_items: int) -> tuple[list[_Item], bool]:
        """The window of the length-sorted queue around ``anchor``, and whether the budget
        (or ``max_items``) stopped its growth."""
        window = self._window(anchor, max_items)
        return self._sorted[window.low : window.high], window.budget_full

    def _grouped_batch(self, anchor: _Item) -> tuple[list[_Item], bool] | None:
        """With prefix grouping, the batch formed around ``anchor``'s prompt group: its queued
        items, then the other groups of two or more, whole (nearest in prompt length first),
        as many as the budget holds with each group's shared prompt counted once; and whether
        the budget stopped it. None when ``anchor`` has no queued group mate (the window then
        serves)."""
        key = anchor.encoded.prefix_key
        if not self.group_prefixes or key is None or len(self._by_prefix.get(key, ())) < 2:
            return None
        cost = GroupedCost(self.max_batch_tokens)
        batch: list[_Item] = []
        groups = self._groups_nearest_first(key)
        for item in next(groups):  # the anchor's own group, as much of it as fits
            if not cost.try_add(item.encoded):
                return batch, True
            batch.append(item)
        share = -(-self._prompt_groups() // self.workers)
        # The others whole: a part left behind would run its prompt again.
        for group in itertools.islice(groups, share - 1):
            members = list(group)
            if not cost.try_add_all([item.encoded for item in members]):
                return batch, True
            batch += members
        return batch, False

    def _prompt_groups(self) -> int:
        """How many prompts have two or more items queued."""
        return sum(len(mates) >= 2 for mates in self._by_prefix.values())

    def _groups_nearest_first(self, first_key: str) -> Iterator[Iterable[_Item]]:
        """The queued items of ``first_key``'s group, then of every other group of two or
        more, nearest in prompt length first (its prompt is padded to the batch's longest),
        in the order their oldest items arrived where equally near; each in arrival order."""
        anchor = self._by_prefix[first_key]
        yield anchor.values()
        anchor_tokens = _prompt_tokens(anchor)
        seen = {first_key}
        others: list[tuple[int, dict[int, _Item]]] = []
        for item in self._arrivals:
            key = item.encoded.prefix_key
            if not item.queued or key is None or key in seen:
                continue
            seen.add(key)
            mates = self._by_prefix.get(key, {})
            if len(mates) >= 2:
                others.append((abs(_prompt_tokens(mates) - anchor_tokens), mates))
        others.sort(key=lambda other: other[0])  # stable: arrival order among equals
        for _, mates in others:
            yield mates.values()

    def _oldest(self) -> _Item:
        while not self._arrivals[0].queued:
            self._arrivals.popleft()
        return self._arrivals[0]

    def _window(self, anchor: _Item, max_items: int) -> _Window:
        """The slice of the sorted queue around ``anchor`` to run as one batch.

        It grows one neighbour at a time on the side that wastes less padding, as far as the
        budget counted with padding and ``max_items`` allow; of those windows, the largest
        whose whole padded cost keeps ``min_efficiency`` real tokens per computed token is
        taken. (Testing each step alone would stop at the first short neighbour and leave a
        batch of one beside many items that fit well together.)"""
        items = self._sorted
        low = bisect.bisect_left(items, anchor.key, key=_key)
        window = _Window(low, low + 1, real=anchor.encoded.length, width=anchor.encoded.length)
        chosen = window
        while True:
            options = []
            if window.low > 0:
                options.append(window.grown(items[window.low - 1], below=True))
            if window.high < len(items):
                options.append(window.grown(items[window.high], below=False))
            if not options:
                return chosen
            best = max(options, key=lambda w: w.efficiency)
            if best.padded > self.max_batch_tokens or best.high - best.low > max_items:
                chosen.budget_full = True
                return chosen
            window = best
            if window.efficiency >= self.min_efficiency:
                chosen = window

    def _record(self, batch: list[_Item], seconds: float) -> None:
        lengths = [item.encoded.length for item in batch]
        # Each device thread runs at about this rate, side by side with the others.
        self._throughput.record(sum(lengths) * self.workers, seconds)
        _observe(
            self.observer.batch_done,
            items=len(batch),
            real_tokens=sum(lengths),
            padded_tokens=self._computed_tokens(batch, lengths),
            forward_s=seconds,
        )

    def _computed_tokens(self, batch: list[_Item], lengths: list[int]) -> int:
        """What the batch's forward computed, for the metrics: a figure, never a failure."""
        padded = len(batch) * max(lengths)
        if self.computed_tokens is None:
            return padded
        try:
            return self.computed_tokens([item.encoded for item in batch])
        except Exception:
            log.exception("counting a batch's computed tokens failed; counted it padded")
            return padded

    def _to_loop(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        # RuntimeError: the loop closed during shutdown, and nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    # --- shared, under the lock ------------------------------------------------------------

    def _unqueue(self, item: _Item) -> None:
        position = bisect.bisect_left(self._sorted, item.key, key=_key)
        del self._sorted[position]
        item.queued = False
        if (key := item.encoded.prefix_key) is not None and (mates := self._by_prefix.get(key)):
            mates.pop(item.key[1], None)
            if not mates:
                del self._by_prefix[key]
        self._queued_tokens -= item.encoded.length

    def _queue_changed(self) -> None:
        _observe(self.observer.queue_changed, len(self._sorted), self._queued_tokens)

    def _retry_after_s(self) -> int:
        rate = self._throughput.tokens_per_s
        seconds = self._queued_tokens / rate if rate > 0 else 1.0
        return max(1, min(60, math.ceil(seconds)))


def _prompt_tokens(mates: dict[int, _Item]) -> int:
    """The leading tokens two of a prompt group's queued items share: its prompt's length
    (short of left truncation)."""
    first, second, *_ = (item.encoded.input_ids for item in mates.values())
    return shared_tokens(first, second)


def _key(item: _Item) -> tuple[int, int]:
    return item.key


def _scoring_failed(incident: str) -> BatchFailed:
    # What the caller reads names nothing internal (device, paths, memory figures): the log
    # has the exception under the same incident id.
    return BatchFailed(f"the reward model failed on an item of this request (incident {incident})")


def _observe(report: Callable[..., None], *args: object, **kwargs: object) -> None:
    """Report to the observer; a failing report (metrics) must never cost a batch or a thread."""
    try:
        report(*args, **kwargs)
    except Exception:
        log.exception("the batch observer failed")
