"""Baselines for the API: lookups for rewards requests, uploads and their bookkeeping.

A lookup goes cache -> compute from the stored responses -> missing (DESIGN.md 4). When the
store fails or is slower than ``CRS_BASELINE_BUDGET_S``, every prompt of the request is
"unavailable" and the store is left alone for ``CRS_STORE_COOLDOWN_S``, so an outage costs each
request at most one budget, and most requests nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from service.baselines.contrastive import BaselineStats
from service.baselines.memory import MemoryBaselineStore
from service.baselines.redis_store import connect
from service.baselines.store import BaselineStore, BaselineWrite, StoredPrompt, StoreUnavailable
from service.metrics import Metrics
from service.scoring.types import RewardInput
from service.settings import Settings
from trainer_client.prompt_id import Prompt

log = logging.getLogger("crs.baselines")

Source = Literal["cache", "computed", "missing", "unavailable"]
# Scores (prompt, response) pairs with the active model, through the shared batcher.
Scorer = Callable[[Sequence[RewardInput]], Awaitable[list[float]]]
APPEND_ATTEMPTS = 3


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Uploaded:
    """What became of one uploaded prompt."""

    prompt_id: str
    stats: BaselineStats
    stored: bool
    error: str | None = None


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
        self._computing: dict[tuple[str, str, str], asyncio.Future[list[float]]] = {}

    async def check(self) -> None:
        """Log whether the store answers; never fatal (baselines degrade, rewards go on)."""
        try:
            await asyncio.wait_for(self.store.ping(), self._settings.baseline_budget_s)
            log.info("baseline store: %s, reachable", self.store.kind)
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("baseline store %s is not reachable now: %s", self.store.kind, exc)

    # --- rewards requests ---------------------------------------------------------------------

    async def resolve(
        self, prompts: Mapping[str, Prompt], version: str, score: Scorer
    ) -> dict[str, Baseline]:
        """Each prompt's baseline under ``version``: cached, computed now, missing, or
        unavailable (the store failed)."""
        if not prompts:
            return {}
        found = await self._lookup(list(prompts), version)
        if found is None:
            return dict.fromkeys(prompts, Baseline("unavailable"))
        baselines = {pid: Baseline("missing") for pid in prompts if pid not in found}
        for pid, stored in found.items():
            if stored.rewards is not None:
                baselines[pid] = Baseline("cache", stored.rewards)
        todo = {pid: stored for pid, stored in found.items() if stored.rewards is None}
        computed = await asyncio.gather(
            *(
                self._computed(pid, prompts[pid], stored, version, score)
                for pid, stored in todo.items()
            )
        )
        baselines.update(zip(todo, computed, strict=True))
        return baselines

    async def _lookup(self, prompt_ids: list[str], version: str) -> dict[str, StoredPrompt] | None:
        if time.monotonic() < self._cooldown_until:
            self._metrics.store_skipped.inc()
            return None
        try:
            async with asyncio.timeout(self._settings.baseline_budget_s):
                return await self.store.lookup(prompt_ids, version)
        except (StoreUnavailable, TimeoutError) as exc:
            self._store_failed("lookup", exc)
            return None

    async def _computed(
        self, prompt_id: str, prompt: Prompt, stored: StoredPrompt, version: str, score: Scorer
    ) -> Baseline:
        if not stored.responses:
            return Baseline("missing")
        key = (prompt_id, version, stored.digest)
        if (pending := self._computing.get(key)) is not None:
            return Baseline("computed", await asyncio.shield(pending))
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._computing[key] = future
        try:
            # The stored prompt is the one the responses answer (a /get_reward prompt is the
            # formatted text, which the model's template must not wrap again).
            rewards = await score(pairs(stored.prompt or prompt, stored.responses))
            future.set_result(rewards)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a failure with no other waiter is not "unhandled"
            raise
        finally:
            del self._computing[key]
        await self._cache(prompt_id, stored.digest, version, rewards)
        return Baseline("computed", rewards)

    async def _cache(self, prompt_id: str, digest: str, version: str, rewards: list[float]) -> None:
        """Best effort: a failure only means computing again next time."""
        try:
            async with asyncio.timeout(self._settings.baseline_budget_s):
                await self.store.cache_rewards(prompt_id, digest, version, rewards)
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
        version: str,
        score: Scorer,
    ) -> list[Uploaded]:
        """Score and store each prompt's responses; a store failure marks only its prompts."""
        if mode == "replace":
            return await self._replace(uploads, version, score)
        return list(await asyncio.gather(*(self._append(u, version, score) for u in uploads)))

    async def _replace(
        self, uploads: Sequence[Upload], version: str, score: Scorer
    ) -> list[Uploaded]:
        rewards = await score([pair for u in uploads for pair in pairs(u.prompt, u.responses)])
        writes, start = [], 0
        for upload in uploads:
            end = start + len(upload.responses)
            writes.append(upload_write(upload, upload.responses, rewards[start:end], version))
            start = end
        try:
            stored = await self.store.write(writes)
        except StoreUnavailable as exc:
            return [not_stored(write, str(exc)) for write in writes]
        return [uploaded(write, ok) for write, ok in zip(writes, stored, strict=True)]

    async def _append(self, upload: Upload, version: str, score: Scorer) -> Uploaded:
        """Read, score what is new (and the old responses if this version never scored them),
        write back only if nobody changed the prompt meanwhile; a few tries."""
        new_rewards = await score(pairs(upload.prompt, upload.responses))
        write = upload_write(upload, upload.responses, new_rewards, version)
        for _ in range(APPEND_ATTEMPTS):
            try:
                found = await self.store.lookup([upload.prompt_id], version, with_responses=True)
                old = found.get(upload.prompt_id)
                old_responses = (old.responses or []) if old is not None else []
                old_rewards = old.rewards if old is not None else None
                if old_rewards is None:
                    old_rewards = await score(pairs(upload.prompt, old_responses))
                write = upload_write(
                    upload, old_responses + upload.responses, old_rewards + new_rewards, version
                )
                [stored] = await self.store.write([write], [old.digest if old else ""])
            except StoreUnavailable as exc:
                return not_stored(write, str(exc))
            if stored:
                return uploaded(write, True)
        return not_stored(write, CONFLICT)


CONFLICT = "the prompt's responses changed during the append; send it again"


def upload_write(
    upload: Upload, responses: list[str], rewards: list[float], version: str
) -> BaselineWrite:
    return BaselineWrite(
        prompt_id=upload.prompt_id,
        prompt=upload.prompt,
        responses=responses,
        version=version,
        rewards=rewards,
    )


def uploaded(write: BaselineWrite, stored: bool) -> Uploaded:
    stats = BaselineStats.of(write.rewards)
    if not stored:
        return Uploaded(prompt_id=write.prompt_id, stats=stats, stored=False, error=CONFLICT)
    return Uploaded(prompt_id=write.prompt_id, stats=stats, stored=True)


def not_stored(write: BaselineWrite, error: str) -> Uploaded:
    stats = BaselineStats.of(write.rewards)
    return Uploaded(prompt_id=write.prompt_id, stats=stats, stored=False, error=error)


def pairs(prompt: Prompt, responses: Sequence[str]) -> list[RewardInput]:
    return [RewardInput(prompt=prompt, response=response) for response in responses]
