"""The in-process baseline store: the default without ``--redis-url``, for one replica only
(another process cannot see it, and it is gone on restart)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.baselines.store import (
    CONFLICT,
    DUPLICATE,
    STORED,
    UPLOADS_KEPT,
    UPLOADS_TTL_S,
    BaselineWrite,
    StoredPrompt,
    StoreKind,
    WriteOutcome,
    responses_digest,
)
from trainer_client.prompt_id import Prompt


@dataclass(slots=True)
class _Entry:
    prompt: Prompt
    responses: list[str]
    digest: str
    # version -> (digest of the responses they score, rewards)
    rewards: dict[str, tuple[str, list[float]]] = field(default_factory=dict)


class MemoryBaselineStore:
    """Implements ``BaselineStore`` with a dict; every method runs without awaiting, so each
    one is atomic on the event loop."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        # prompt id -> upload id -> when it was applied (monotonic), oldest first
        self._uploads: dict[str, dict[str, float]] = {}

    @property
    def kind(self) -> StoreKind:
        return "memory"

    async def lookup(
        self,
        prompt_ids: Sequence[str],
        version: str,
        *,
        with_responses: bool = False,
        partial: bool = False,  # nothing here fails in part
    ) -> dict[str, StoredPrompt]:
        found: dict[str, StoredPrompt] = {}
        for prompt_id in prompt_ids:
            entry = self._entries.get(prompt_id)
            if entry is None:
                continue
            rewards = _current(entry, version)
            load = with_responses or rewards is None
            found[prompt_id] = StoredPrompt(
                digest=entry.digest,
                rewards=rewards,
                responses=list(entry.responses) if load else None,
                prompt=entry.prompt if load else None,
            )
        return found

    async def write(
        self, writes: Sequence[BaselineWrite], expected_digests: Sequence[str | None] = ()
    ) -> list[WriteOutcome]:
        expected = list(expected_digests) or [None] * len(writes)
        return [self._write(w, e) for w, e in zip(writes, expected, strict=True)]

    def _write(self, write: BaselineWrite, expected_digest: str | None) -> WriteOutcome:
        current = self._entries.get(write.prompt_id)
        if expected_digest is not None and expected_digest != (current.digest if current else ""):
            return CONFLICT
        if write.upload_id is not None:
            applied = self._record_upload(write.prompt_id, write.upload_id)
            if applied and expected_digest is not None:
                return DUPLICATE
        digest = responses_digest(write.responses)
        entry = _Entry(prompt=write.prompt, responses=list(write.responses), digest=digest)
        if current is not None:
            entry.rewards = current.rewards  # other versions' rewards stay, tagged by digest
        entry.rewards[write.version] = (digest, list(write.rewards))
        self._entries[write.prompt_id] = entry
        return STORED

    def _record_upload(self, prompt_id: str, upload_id: str) -> bool:
        """Record an upload id; whether it was recorded already (and not expired)."""
        uploads = self._uploads.setdefault(prompt_id, {})
        now = time.monotonic()
        for old in [u for u, at in uploads.items() if at < now - UPLOADS_TTL_S]:
            del uploads[old]
        applied = uploads.pop(upload_id, None) is not None
        uploads[upload_id] = now
        while len(uploads) > UPLOADS_KEPT:
            del uploads[next(iter(uploads))]
        return applied

    async def cache_rewards(
        self, prompt_id: str, digest: str, version: str, rewards: Sequence[float]
    ) -> None:
        entry = self._entries.get(prompt_id)
        if entry is not None:
            entry.rewards[version] = (digest, list(rewards))

    async def delete(self, prompt_id: str) -> bool:
        self._uploads.pop(prompt_id, None)
        return self._entries.pop(prompt_id, None) is not None

    async def counts(self, version: str) -> tuple[int, int]:
        scored = sum(_current(entry, version) is not None for entry in self._entries.values())
        return len(self._entries), scored

    async def prompt_ids(self, cursor: str, count: int) -> tuple[str, list[str]]:
        # The cursor is the last id given (ids are never empty: the API refuses them), not an
        # offset: a prompt deleted or added before it during the iteration shifts no other one
        # out of it. ``nsmallest`` rather than a sort: one page costs O(n log count).
        if count <= 0:
            raise ValueError("count must be positive")
        ids = heapq.nsmallest(count, (pid for pid in self._entries if pid > cursor))
        return (ids[-1] if len(ids) == count else ""), ids

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _current(entry: _Entry, version: str) -> list[float] | None:
    """The version's rewards if they score the entry's current responses."""
    cached = entry.rewards.get(version)
    if cached is None or cached[0] != entry.digest:
        return None
    return list(cached[1])
