"""Where baselines live: one protocol, with a Redis and an in-process implementation.

Per prompt the store keeps the baseline responses once (model independent, with the prompt they
answer) and, per model version, their rewards. Rewards are tagged with the digest of the
responses they score: a reward list whose digest is not the prompt's current one (the responses
were replaced or appended to since) is not used, so rewards never mix with other responses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from trainer_client.prompt_id import Prompt

StoreKind = Literal["redis", "memory"]


class StoreUnavailable(RuntimeError):
    """The store did not answer (down, unreachable or too slow)."""


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


@dataclass(frozen=True, slots=True, kw_only=True)
class BaselineWrite:
    """Responses of one prompt and their rewards under ``version``, to store."""

    prompt_id: str
    prompt: Prompt
    responses: list[str]
    version: str
    rewards: list[float]


class BaselineStore(Protocol):
    """The operations the service needs; implementations raise ``StoreUnavailable``."""

    @property
    def kind(self) -> StoreKind: ...

    async def lookup(
        self, prompt_ids: Sequence[str], version: str, *, with_responses: bool = False
    ) -> dict[str, StoredPrompt]:
        """The stored prompts among ``prompt_ids`` (absent ones are left out)."""

    async def write(
        self, writes: Sequence[BaselineWrite], expected_digests: Sequence[str | None] = ()
    ) -> list[bool]:
        """For each write, make its responses the prompt's and cache their rewards under its
        version; one round trip for all. With an expected digest (an append), only if the
        prompt's current digest is that one ("" for an absent prompt): False, and nothing
        written for that prompt, when it changed meanwhile."""

    async def cache_rewards(
        self, prompt_id: str, digest: str, version: str, rewards: Sequence[float]
    ) -> None:
        """Keep rewards computed for the responses of ``digest`` under ``version``."""

    async def delete(self, prompt_id: str) -> bool:
        """Forget a prompt; False when it was not stored."""

    async def counts(self, version: str) -> tuple[int, int]:
        """Stored prompts, and how many of them have rewards cached under ``version``."""

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


def responses_digest(responses: Sequence[str]) -> str:
    """The identity of a response list: storing the same list again keeps it, so a replace is
    idempotent and the rewards other versions cached for it stay valid."""
    data = json.dumps(list(responses), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:32]
