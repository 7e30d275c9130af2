"""Baselines follow the model: a pass that scores every stored baseline response with a new
model version before it is activated (issue 10, DESIGN.md 4), so that its first contrastive
rewards come from the cache rather than from scoring at request time.

The pass pages through the store's prompt index. Per page it looks the prompts up under the
new version; a prompt whose rewards that version cached already (another replica rescored it,
or an earlier pass did) costs nothing more. The others' responses are scored in one call, so
the version's batcher sees full batches, and their rewards are cached under the version, tagged
with the digest of the responses they score (a prompt replaced meanwhile keeps rewards that are
never used for its new responses). Old versions' rewards are left alone.

Failures: a store that does not answer is retried a few times, then fails the pass (the caller
decides; an eager activation then leaves the old version active). A page the scorer refuses
(an item too long, or empty, or one the model gives no finite reward for) is scored prompt by
prompt, and only the prompts refused are counted failed: one bad prompt never stops the pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from service.baselines.service import ScoringLease, pairs
from service.baselines.store import BaselineStore, StoredPrompt, StoreFull, StoreUnavailable
from service.scoring.types import NonFiniteReward, RewardInput

log = logging.getLogger("crs.baselines.rebaseline")

T = TypeVar("T")
RebaselineState = Literal["running", "done", "failed"]
# What became of one prompt of the pass (the metric's label).
Outcome = Literal["scored", "cached_already", "failed"]
# What the scorer answers for items it cannot score (InputTooLong and EmptyInput are
# ValueErrors): about those items, not the model, so they cost their prompts only.
REFUSALS: tuple[type[Exception], ...] = (ValueError, NonFiniteReward)
LOG_STEPS = 10  # progress logged at every tenth


class RebaselineFailed(RuntimeError):
    """The pass cannot go on (the store, or the scorer itself, failed); the message says why."""


@dataclass(frozen=True, slots=True)
class StoreRetry:
    """How often a store operation of the pass is tried before the pass fails, and the pause
    before the first retry (doubled at each)."""

    attempts: int = 3
    backoff_s: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.backoff_s < 0:
            raise ValueError("backoff_s must not be negative")


DEFAULT_RETRY = StoreRetry()


class RebaselineObserver(Protocol):
    """Where a pass reports (the service's metrics)."""

    def rebaseline_prompts(self, version: str, count: int, outcome: str) -> None: ...

    def rebaseline_progress(self, version: str, fraction: float) -> None: ...


@dataclass(kw_only=True)
class RebaselineProgress:
    """How far one pass is; changed in place as it runs (``GET /v1/models`` shows it)."""

    state: RebaselineState = "running"
    # Stored prompts when the pass started (other replicas may add or delete some meanwhile);
    # the number the pass went through once it is done.
    prompts_total: int | None = None
    # Prompts gone through: scored, cached already, failed, or deleted meanwhile.
    prompts_done: int = 0
    responses_scored: int = 0
    prompts_cached_already: int = 0
    prompts_failed: int = 0
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def fraction(self) -> float:
        """Done, from 0 to 1; 1 once the pass ended, however it ended."""
        if self.state != "running":
            return 1.0
        if not self.prompts_total:
            return 0.0
        return min(1.0, self.prompts_done / self.prompts_total)

    def as_dict(self) -> dict[str, Any]:
        """The API's view (``GET /v1/models``, ``rebaseline``)."""
        return dataclasses.asdict(self)


async def rebaseline(
    store: BaselineStore,
    scoring: ScoringLease,
    progress: RebaselineProgress,
    *,
    prompts_per_batch: int = 64,
    observer: RebaselineObserver | None = None,
    retry: StoreRetry = DEFAULT_RETRY,
) -> RebaselineProgress:
    """Score every stored prompt's baseline responses with ``scoring``'s version and cache the
    rewards; ``progress`` tells how far it is meanwhile and how it ended ("done" or "failed"
    with ``error``). Never raises for a failure of the store or the scorer: the caller reads
    ``progress.state``. Cancelling it marks it failed."""
    if prompts_per_batch <= 0:
        raise ValueError("prompts_per_batch must be positive")
    return await _Pass(store, scoring, progress, observer, retry).run(prompts_per_batch)


@dataclass
class _Page:
    """What became of one page's prompts."""

    prompts: int = 0
    scored: int = 0
    responses: int = 0
    cached_already: int = 0
    failed: int = 0


class _Pass:
    """One rebaseline pass and its bookkeeping."""

    def __init__(
        self,
        store: BaselineStore,
        scoring: ScoringLease,
        progress: RebaselineProgress,
        observer: RebaselineObserver | None,
        retry: StoreRetry,
    ) -> None:
        self.store = store
        self.scoring = scoring
        self.version = scoring.version
        self.progress = progress
        self.observer = observer
        self.retry = retry
        # Ids already gone through: SSCAN may give one again (the index grew meanwhile), and
        # it must count once. Ids only: small beside what the store keeps per prompt.
        self.seen: set[str] = set()
        self.logged_step = 0

    async def run(self, prompts_per_batch: int) -> RebaselineProgress:
        progress = self.progress
        progress.state, progress.error = "running", None
        progress.started_at, progress.finished_at = time.time(), None
        try:
            total, _ = await self._store("counts", lambda: self.store.counts(self.version))
            progress.prompts_total = total
            log.info("rebaseline %s: started, %d stored prompts", self.version, total)
            self._report(_Page())
            await self._all_pages(prompts_per_batch)
        except RebaselineFailed as exc:
            self._finish("failed", str(exc))
        except asyncio.CancelledError:
            self._finish("failed", "cancelled")
            raise
        except Exception as exc:  # a bug: the pass fails, the service goes on
            log.exception("rebaseline %s: unexpected failure", self.version)
            self._finish("failed", f"unexpected failure: {type(exc).__name__}: {exc}")
        else:
            self._finish("done", None)
        return progress

    async def _all_pages(self, prompts_per_batch: int) -> None:
        cursor = ""
        while True:
            scan = functools.partial(self.store.prompt_ids, cursor, prompts_per_batch)
            cursor, ids = await self._store("scan", scan)
            fresh = [pid for pid in dict.fromkeys(ids) if pid not in self.seen]
            self.seen.update(fresh)
            # SSCAN's count is a hint: a page may be larger, a batch is not.
            for batch in _chunks(fresh, prompts_per_batch):
                self._report(await self._page(batch))
            if not cursor:
                return

    async def _page(self, prompt_ids: list[str]) -> _Page:
        """Score and cache the prompts of one page that the version has not scored."""
        page = _Page(prompts=len(prompt_ids))
        found = await self._store("lookup", lambda: self.store.lookup(prompt_ids, self.version))
        todo: dict[str, StoredPrompt] = {}
        for prompt_id, stored in found.items():
            if stored.rewards is not None:
                page.cached_already += 1
            elif stored.corrupt or stored.prompt is None or not stored.responses:
                log.info("rebaseline %s: prompt %s has nothing to score", self.version, prompt_id)
                page.failed += 1
            else:
                todo[prompt_id] = stored
        rewards = await self._score(todo)
        page.failed += len(todo) - len(rewards)
        for prompt_id, prompt_rewards in rewards.items():
            cache = functools.partial(
                self.store.cache_rewards,
                prompt_id,
                todo[prompt_id].digest,
                self.version,
                prompt_rewards,
            )
            await self._store("cache", cache)
            page.scored += 1
            page.responses += len(prompt_rewards)
        return page

    async def _score(self, todo: dict[str, StoredPrompt]) -> dict[str, list[float]]:
        """Rewards of each prompt's responses: all in one call, or prompt by prompt when that
        call is refused (then the prompts refused are left out)."""
        if not todo:
            return {}
        try:
            rewards = await self._scored([pair for s in todo.values() for pair in _pairs(s)])
        except REFUSALS as exc:
            log.info(
                "rebaseline %s: a page of %d prompts was refused (%s); scoring them one by one",
                self.version,
                len(todo),
                exc,
            )
            return await self._one_by_one(todo)
        by_prompt: dict[str, list[float]] = {}
        start = 0
        for prompt_id, stored in todo.items():
            end = start + len(stored.responses or ())
            by_prompt[prompt_id] = rewards[start:end]
            start = end
        return by_prompt

    async def _one_by_one(self, todo: dict[str, StoredPrompt]) -> dict[str, list[float]]:
        scored: dict[str, list[float]] = {}
        for prompt_id, stored in todo.items():
            try:
                scored[prompt_id] = await self._scored(_pairs(stored))
            except REFUSALS as exc:
                log.warning(
                    "rebaseline %s: prompt %s cannot be scored (%s); its baseline is left to "
                    "be computed at first use",
                    self.version,
                    prompt_id,
                    exc,
                )
        return scored

    async def _scored(self, batch: Sequence[RewardInput]) -> list[float]:
        """The scorer's rewards; a failure that is not a refusal of the items fails the pass."""
        try:
            rewards = await self.scoring.score(batch)
        except REFUSALS:
            raise
        except Exception as exc:
            raise RebaselineFailed(
                f"scoring with {self.version} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if len(rewards) != len(batch):
            raise RebaselineFailed(
                f"scoring with {self.version} answered {len(rewards)} rewards "
                f"for {len(batch)} responses"
            )
        return rewards

    async def _store(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """One store operation, tried ``retry.attempts`` times while the store is unavailable
        (a full store is not retried: waiting does not free memory)."""
        attempt = 1
        while True:
            try:
                return await call()
            except StoreFull as exc:
                raise RebaselineFailed(f"baseline store {op} failed: {exc}") from exc
            except StoreUnavailable as exc:
                if attempt >= self.retry.attempts:
                    raise RebaselineFailed(
                        f"baseline store {op} failed {attempt} times in a row, last: {exc}"
                    ) from exc
                log.info("rebaseline %s: store %s failed (%s), retrying", self.version, op, exc)
            await asyncio.sleep(self.retry.backoff_s * 2 ** (attempt - 1))
            attempt += 1

    def _report(self, page: _Page) -> None:
        """Add one page to the progress, the metrics and (every tenth) the log."""
        progress = self.progress
        progress.prompts_done += page.prompts
        progress.responses_scored += page.responses
        progress.prompts_cached_already += page.cached_already
        progress.prompts_failed += page.failed
        if progress.prompts_total is not None and progress.prompts_done > progress.prompts_total:
            progress.prompts_total = progress.prompts_done  # prompts were added meanwhile
        if self.observer is not None:
            counts = {"scored": page.scored, "cached_already": page.cached_already}
            for outcome, count in {**counts, "failed": page.failed}.items():
                if count:
                    self.observer.rebaseline_prompts(self.version, count, outcome)
            self.observer.rebaseline_progress(self.version, progress.fraction)
        step = int(progress.fraction * LOG_STEPS)
        if step > self.logged_step:
            self.logged_step = step
            log.info("rebaseline %s: %s", self.version, _summary(progress))

    def _finish(self, state: RebaselineState, error: str | None) -> None:
        progress = self.progress
        progress.state, progress.error = state, error
        progress.finished_at = time.time()
        if state == "done":
            progress.prompts_total = progress.prompts_done
            log.info("rebaseline %s: done, %s", self.version, _summary(progress))
        else:
            log.warning("rebaseline %s: failed (%s), %s", self.version, error, _summary(progress))
        if self.observer is not None:
            self.observer.rebaseline_progress(self.version, progress.fraction)


def _pairs(stored: StoredPrompt) -> list[RewardInput]:
    assert stored.prompt is not None
    assert stored.responses is not None
    return pairs(stored.prompt, stored.responses)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _summary(progress: RebaselineProgress) -> str:
    return (
        f"{progress.prompts_done}/{progress.prompts_total} prompts, "
        f"{progress.responses_scored} responses scored, "
        f"{progress.prompts_cached_already} cached already, {progress.prompts_failed} failed"
    )
