"""Baselines for the API: lookups for rewards requests, uploads and their bookkeeping.

A lookup goes cache -> compute from the stored responses -> missing (DESIGN.md 4). When the
store fails or is slower than ``CRS_BASELINE_BUDGET_S``, every prompt of the request is
"unavailable" and the store is left alone for ``CRS_STORE_COOLDOWN_S``, so an outage costs each
request at most one budget, and most requests nothing. When part of it fails (a Redis Cluster
node), only the prompts of that part are "unavailable", and the rest of the store is not left
alone (the store itself leaves the failed node alone meanwhile).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from service.baselines.contrastive import BaselineStats
from service.baselines.memory import MemoryBaselineStore
from service.baselines.redis_store import connect
from service.baselines.store import (
    BaselineStore,
    BaselineWrite,
    PartlyUnavailable,
    StoredPrompt,
    StoreFull,
    StoreUnavailable,
    WriteOutcome,
    WriteStatus,
)
from service.metrics import Metrics
from service.scoring.types import RewardInput
from service.settings import Settings
from trainer_client.prompt_id import Prompt

log = logging.getLogger("crs.baselines")

Source = Literal["cache", "computed", "missing", "unavailable"]
# Why an uploaded prompt was not stored, as the API names it.
UploadError = Literal["not_ready", "store_full", "conflict", "corrupt_entry"]
UPLOAD_ERRORS: dict[WriteStatus, UploadError] = {
    "unavailable": "not_ready",
    "full": "store_full",
    "conflict": "conflict",
    "corrupt": "corrupt_entry",
}
APPEND_ATTEMPTS = 3


class ScoringLease(Protocol):
    """One model version held for a whole task: its version and its scoring come together, so
    rewards are never scored by one version and cached under another."""

    @property
    def version(self) -> str: ...

    async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
        """Raw rewards of (prompt, response) pairs under ``version``, in order."""
        ...


@dataclass(frozen=True, slots=True)
class Baseline:
    """One prompt's baseline rewards for a request, and where they came from."""

    source: Source
    rewards: list[float] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    """One prompt of a ``PUT /v1/baselines``."""

    prompt_id: str
    prompt: Prompt
    responses: list[str]
    # The client's idempotency key of this prompt's upload (reused on every retry of it).
    upload_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Uploaded:
    """What became of one uploaded prompt."""

    prompt_id: str
    stats: BaselineStats
    stored: bool
    error: str | None = None
    error_type: UploadError | None = None
    # An append whose upload id was applied already: nothing added, ``stats`` as stored now.
    duplicate: bool = False
    upload_id: str | None = None


def open_store(settings: Settings, metrics: Metrics) -> BaselineStore:
    """Redis when ``CRS_REDIS_URL`` is set, else the in-process store (one replica only)."""
    if settings.redis_url is None:
        log.warning(
            "no --redis-url: baselines live in this process only (single replica; lost on "
            "restart, invisible to other replicas)"
        )
        return MemoryBaselineStore()
    return connect(settings, metrics)


class BaselineService:
    """Baseline lookups and uploads over one store, for whichever model version asks."""

    def __init__(self, store: BaselineStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self._settings = settings
        self._metrics = metrics
        self._cooldown_until = 0.0
        # (prompt id, version, digest) -> rewards being computed: concurrent requests for one
        # prompt score its responses once.
        self._computing: dict[tuple[str, str, str], asyncio.Task[list[float]]] = {}

    async def check(self) -> None:
        """Log whether the store answers; never fatal (baselines degrade, rewards go on)."""
        try:
            await asyncio.wait_for(self.store.ping(), self._settings.baseline_budget_s)
            log.info("baseline store: %s, reachable", self.store.kind)
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("baseline store %s is not reachable now: %s", self.store.kind, exc)

    # --- rewards requests ---------------------------------------------------------------------

    async def resolve(
        self, prompts: Mapping[str, Prompt], scoring: ScoringLease
    ) -> dict[str, Baseline]:
        """Each prompt's baseline under the leased version: cached, computed now (with that
        same version), missing, or unavailable (the store failed)."""
        if not prompts:
            return {}
        found = await self._lookup(list(prompts), scoring.version)
        if found is None:
            return dict.fromkeys(prompts, Baseline("unavailable"))
        baselines = {pid: Baseline("missing") for pid in prompts if pid not in found}
        for pid, stored in found.items():
            if stored.unavailable:
                baselines[pid] = Baseline("unavailable")
            elif stored.rewards is not None:
                baselines[pid] = Baseline("cache", stored.rewards)
        todo = {
            pid: stored
            for pid, stored in found.items()
            if stored.rewards is None and not stored.unavailable
        }
        computed = await asyncio.gather(
            *(self._computed(pid, prompts[pid], stored, scoring) for pid, stored in todo.items())
        )
        baselines.update(zip(todo, computed, strict=True))
        return baselines

    async def _lookup(self, prompt_ids: list[str], version: str) -> dict[str, StoredPrompt] | None:
        if time.monotonic() < self._cooldown_until:
            self._metrics.store_skipped.inc()
            return None
        try:
            async with asyncio.timeout(self._settings.baseline_budget_s):
                return await self.store.lookup(prompt_ids, version, partial=True)
        except PartlyUnavailable as exc:  # the rest of the store answers: no cool-down
            log.warning("baseline store lookup failed in part: %s", exc)
            return None
        except (StoreUnavailable, TimeoutError) as exc:
            self._store_failed("lookup", exc)
            return None

    async def _computed(
        self, prompt_id: str, prompt: Prompt, stored: StoredPrompt, scoring: ScoringLease
    ) -> Baseline:
        if not stored.responses:
            return Baseline("missing")
        key = (prompt_id, scoring.version, stored.digest)
        task = self._computing.get(key)
        if task is None:
            # Its own task, not the first asker's: a cancelled request cancels only its wait.
            # The stored prompt is the one the responses answer (a /get_reward prompt is the
            # formatted text, which the model's template must not wrap again).
            task = asyncio.create_task(
                self._compute(prompt_id, stored.prompt or prompt, stored, scoring),
                name=f"baseline {prompt_id}",
            )
            self._computing[key] = task
            task.add_done_callback(functools.partial(self._computation_done, key))
        return Baseline("computed", await asyncio.shield(task))

    async def _compute(
        self, prompt_id: str, prompt: Prompt, stored: StoredPrompt, scoring: ScoringLease
    ) -> list[float]:
        """Score a prompt's stored responses and cache them; bounded like a request, so it
        ends even when every request waiting on it went away."""
        assert stored.responses is not None
        async with asyncio.timeout(self._settings.request_timeout_s):
            rewards = await scoring.score(pairs(prompt, stored.responses))
        await self._cache(prompt_id, stored.digest, scoring.version, rewards)
        return rewards

    def _computation_done(self, key: tuple[str, str, str], task: asyncio.Task[list[float]]) -> None:
        if self._computing.get(key) is task:
            del self._computing[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waits for any more is not "unhandled"

    async def _cache(self, prompt_id: str, digest: str, version: str, rewards: list[float]) -> None:
        """Best effort: a failure only means computing again next time."""
        try:
            async with asyncio.timeout(self._settings.baseline_budget_s):
                await self.store.cache_rewards(prompt_id, digest, version, rewards)
        except (StoreFull, PartlyUnavailable) as exc:  # the rest still works: no cool-down
            log.warning("baseline store cache failed: %s", exc)
        except (StoreUnavailable, TimeoutError) as exc:
            self._store_failed("cache", exc)

    def _store_failed(self, op: str, exc: BaseException) -> None:
        self._cooldown_until = time.monotonic() + self._settings.store_cooldown_s
        log.warning("baseline store %s failed (%s); answering 'unavailable'", op, exc or "timeout")

    # --- uploads ------------------------------------------------------------------------------

    async def upload(
        self,
        uploads: Sequence[Upload],
        mode: Literal["replace", "append"],
        scoring: ScoringLease,
    ) -> list[Uploaded]:
        """Score and store each prompt's responses; a store failure marks only its prompts.
        Every write carries an upload id (the client's, else one for this request), so the
        store's own retries never apply a write twice."""
        upload_ids = [u.upload_id or f"crs-{uuid.uuid4().hex}" for u in uploads]
        if mode == "replace":
            return await self._replace(uploads, upload_ids, scoring)
        appends = zip(uploads, upload_ids, strict=True)
        return list(await asyncio.gather(*(self._append(u, i, scoring) for u, i in appends)))

    async def _replace(
        self, uploads: Sequence[Upload], upload_ids: list[str], scoring: ScoringLease
    ) -> list[Uploaded]:
        version = scoring.version
        rewards = await scoring.score(
            [pair for u in uploads for pair in pairs(u.prompt, u.responses)]
        )
        writes, start = [], 0
        for upload, upload_id in zip(uploads, upload_ids, strict=True):
            end = start + len(upload.responses)
            write = upload_write(upload, upload.responses, rewards[start:end], version, upload_id)
            writes.append(write)
            start = end
        outcomes = await self._write(writes)
        return [
            # "duplicate" here is a re-read's answer (the id is recorded, others wrote since):
            # a replace is applied whatever was recorded, so it is stored.
            outcome_of(upload, write, outcome, duplicate=False)
            for upload, write, outcome in zip(uploads, writes, outcomes, strict=True)
        ]

    async def _append(self, upload: Upload, upload_id: str, scoring: ScoringLease) -> Uploaded:
        """Read, score what is new (and the old responses if this version never scored them),
        write back only if nobody changed the prompt meanwhile and the upload id is new; a few
        tries."""
        version, score = scoring.version, scoring.score
        new_rewards = await score(pairs(upload.prompt, upload.responses))
        write = upload_write(upload, upload.responses, new_rewards, version, upload_id)
        outcome = WriteOutcome("conflict", CONFLICT)
        for _ in range(APPEND_ATTEMPTS):
            try:
                found = await self.store.lookup([upload.prompt_id], version, with_responses=True)
            except StoreUnavailable as exc:
                return outcome_of(upload, write, failed_write(exc))
            old = found.get(upload.prompt_id)
            if old is not None and old.corrupt:
                return outcome_of(upload, write, WriteOutcome("corrupt", CORRUPT))
            old_responses = (old.responses or []) if old is not None else []
            old_rewards = old.rewards if old is not None else None
            if old_rewards is None:
                old_rewards = await score(pairs(upload.prompt, old_responses))
            write = upload_write(
                upload,
                old_responses + upload.responses,
                old_rewards + new_rewards,
                version,
                upload_id,
            )
            [outcome] = await self._write([write], [old.digest if old else ""])
            if outcome.status == "duplicate":
                return await self._applied_before(upload, write, old, old_rewards, scoring)
            if outcome.status != "conflict":
                return outcome_of(upload, write, outcome)
        return outcome_of(upload, write, WriteOutcome("conflict", CONFLICT))

    async def _applied_before(
        self,
        upload: Upload,
        write: BaselineWrite,
        old: StoredPrompt | None,
        old_rewards: list[float],
        scoring: ScoringLease,
    ) -> Uploaded:
        """An append whose upload id was applied already: answer with what is stored now."""
        version, score = scoring.version, scoring.score
        rewards = old_rewards
        try:
            found = await self.store.lookup([upload.prompt_id], version, with_responses=True)
            now = found.get(upload.prompt_id)
            if now is not None and not now.corrupt and (old is None or now.digest != old.digest):
                rewards = now.rewards or await score(pairs(upload.prompt, now.responses or []))
        except StoreUnavailable as exc:
            log.info("re-reading %s after a duplicate upload failed: %s", upload.prompt_id, exc)
        if not rewards:  # the prompt went away since: it is not stored
            return outcome_of(upload, write, WriteOutcome("conflict", CONFLICT))
        stats = BaselineStats.of(rewards)
        return Uploaded(
            prompt_id=upload.prompt_id,
            stats=stats,
            stored=True,
            duplicate=True,
            upload_id=upload.upload_id,
        )

    async def _write(
        self, writes: Sequence[BaselineWrite], expected: Sequence[str | None] = ()
    ) -> list[WriteOutcome]:
        """The store's outcome per write; a store that raises fails all of them."""
        try:
            return await self.store.write(writes, expected)
        except StoreUnavailable as exc:
            return [failed_write(exc)] * len(writes)


CONFLICT = "the prompt's responses changed during the append; send it again"
CORRUPT = (
    "corrupt entry: the store holds a value for this prompt that crs did not write; delete the "
    "prompt (DELETE /v1/baselines/{prompt_id}) and upload it again"
)


def failed_write(exc: StoreUnavailable) -> WriteOutcome:
    return WriteOutcome("full" if isinstance(exc, StoreFull) else "unavailable", str(exc))


def upload_write(
    upload: Upload, responses: list[str], rewards: list[float], version: str, upload_id: str
) -> BaselineWrite:
    return BaselineWrite(
        prompt_id=upload.prompt_id,
        prompt=upload.prompt,
        responses=responses,
        version=version,
        rewards=rewards,
        upload_id=upload_id,
    )


def outcome_of(
    upload: Upload, write: BaselineWrite, outcome: WriteOutcome, *, duplicate: bool = False
) -> Uploaded:
    """What the API says of one prompt: stored (with the statistics of what was written), or
    not, with why."""
    stats = BaselineStats.of(write.rewards)
    if outcome.written:
        return Uploaded(
            prompt_id=write.prompt_id,
            stats=stats,
            stored=True,
            duplicate=duplicate,
            upload_id=upload.upload_id,
        )
    return Uploaded(
        prompt_id=write.prompt_id,
        stats=stats,
        stored=False,
        error=outcome.message or outcome.status,
        error_type=UPLOAD_ERRORS.get(outcome.status, "not_ready"),
        upload_id=upload.upload_id,
    )


def pairs(prompt: Prompt, responses: Sequence[str]) -> list[RewardInput]:
    return [RewardInput(prompt=prompt, response=response) for response in responses]
