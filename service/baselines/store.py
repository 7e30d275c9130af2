"""Where baselines live: one protocol, with a Redis and an in-process implementation.

Per prompt the store keeps the baseline responses once (model independent, with the prompt they
answer) and, per model version, their rewards. Rewards are tagged with the digest of the
responses they score: a reward list whose digest is not the prompt's current one (the responses
were replaced or appended to since) is not used, so rewards never mix with other responses.

A write may carry an upload id: the store records the ids it applied per prompt (the last
``UPLOADS_KEPT``, for ``UPLOADS_TTL_S``) in the same atomic step as the write, so an append
retried with the same id is applied once however often it is sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from trainer_client.prompt_id import Prompt

StoreKind = Literal["redis", "memory"]
# What became of one write: written; "duplicate": its upload id was applied already, nothing
# written; "conflict": the expected digest was not the prompt's; "corrupt": the prompt's keys
# hold values crs did not write; "full": the store is out of memory; "unavailable": the store did
# not answer and nothing of this write is there.
WriteStatus = Literal["stored", "duplicate", "conflict", "corrupt", "full", "unavailable"]
UPLOADS_KEPT = 1024
UPLOADS_TTL_S = 7 * 24 * 3600


class StoreUnavailable(RuntimeError):
    """The store did not answer (down, unreachable or too slow)."""


class PartlyUnavailable(StoreUnavailable):
    """Part of the store did not answer (a Redis Cluster node, with its slots); the rest did.
    Not a reason to leave the whole store alone for a while."""


class StoreFull(StoreUnavailable):
    """The store refused a write for want of memory (Redis ``maxmemory`` with noeviction):
    retrying soon does not help."""


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """The store's answer for one write, and why it was not written."""

    status: WriteStatus
    message: str | None = None

    @property
    def written(self) -> bool:
        """The store holds this write's responses (now, or since an earlier try)."""
        return self.status in ("stored", "duplicate")


STORED = WriteOutcome("stored")
DUPLICATE = WriteOutcome("duplicate")
CONFLICT = WriteOutcome("conflict", "the prompt's responses changed meanwhile")


@dataclass(frozen=True, slots=True)
class StoredPrompt:
    """What the store holds for one prompt, as one model version sees it."""

    digest: str
    # Rewards under the version asked for, or None when that version has not scored these
    # responses yet.
    rewards: list[float] | None
    # Loaded when ``rewards`` is None (they must be scored) or when asked for.
    responses: list[str] | None = None
    prompt: Prompt | None = None
    # The prompt's stored values are not crs's (wrong key type, unreadable JSON): treated as
    # missing by lookups, refused by appends.
    corrupt: bool = False
    # The part of the store that holds the prompt did not answer (a partial lookup only): what
    # it holds is not known.
    unavailable: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineWrite:
    """Responses of one prompt and their rewards under ``version``, to store."""

    prompt_id: str
    prompt: Prompt
    responses: list[str]
    version: str
    rewards: list[float]
    # Recorded with the write; a write whose id the prompt already recorded is not applied
    # again when it is conditional (an append).
    upload_id: str | None = None


class BaselineStore(Protocol):
    """The operations the service needs; implementations raise ``StoreUnavailable``."""

    @property
    def kind(self) -> StoreKind: ...

    async def lookup(
        self,
        prompt_ids: Sequence[str],
        version: str,
        *,
        with_responses: bool = False,
        partial: bool = False,
    ) -> dict[str, StoredPrompt]:
        """The stored prompts among ``prompt_ids`` (absent ones are left out). When part of
        the store fails (a cluster node), ``partial`` answers its prompts as ``unavailable``
        and the others normally; without it, that raises ``PartlyUnavailable``."""

    async def write(
        self, writes: Sequence[BaselineWrite], expected_digests: Sequence[str | None] = ()
    ) -> list[WriteOutcome]:
        """For each write, make its responses the prompt's and cache their rewards under its
        version; one round trip for all, each prompt atomic and answered on its own. With an
        expected digest (an append), only if the prompt's current digest is that one ("" for an
        absent prompt), else "conflict"; then, if its upload id was applied already,
        "duplicate" and nothing written. Never raises for one prompt's failure."""

    async def cache_rewards(
        self, prompt_id: str, digest: str, version: str, rewards: Sequence[float]
    ) -> None:
        """Keep rewards computed for the responses of ``digest`` under ``version``."""

    async def delete(self, prompt_id: str) -> bool:
        """Forget a prompt; False when it was not stored."""

    async def counts(self, version: str) -> tuple[int, int]:
        """Stored prompts, and how many of them have rewards cached under ``version``."""

    async def prompt_ids(self, cursor: str, count: int) -> tuple[str, list[str]]:
        """One page of stored prompt ids (about ``count``; maybe none) and the cursor of the
        next, "" to start and "" back when done: every prompt stored for the whole iteration
        comes in some page, and an id may come in more than one."""

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


def responses_digest(responses: Sequence[str]) -> str:
    """The identity of a response list: storing the same list again keeps it, so a replace is
    idempotent and the rewards other versions cached for it stay valid."""
    data = json.dumps(list(responses), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:32]
