"""What the trainer adapters share: one reward client per event loop, prompt and response
shapes as the service takes them, and which failures are worth stopping a training run for."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Literal

from trainer_client.client.reward_client import AsyncRewardClient, RewardServiceError
from trainer_client.client.wire import Prompt, RewardResult

Use = Literal["contrastive", "raw"]
Normalize = Literal["none", "std"]
OnMissing = Literal["null", "raw", "error"]
OnUnavailable = Literal["null", "raw", "error"]

USES: tuple[str, ...] = ("contrastive", "raw")
NORMALIZES: tuple[str, ...] = ("none", "std")
ON_MISSING: tuple[str, ...] = ("null", "raw", "error")
ON_UNAVAILABLE: tuple[str, ...] = ("null", "raw", "error")

# The baseline_source of a result whose baseline could not be read (the store failed).
UNAVAILABLE = "unavailable"

# Refusals that no retry and no later batch can cure: a bad token (401, 403), or a 409 (the
# pinned model version was swapped out, or on_missing="error" and a prompt has no baseline).
# Training on without rewards would waste the run, so these are raised, not logged.
FATAL_STATUSES = frozenset({401, 403, 409})


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse an option outside ``choices`` when the adapter is built, not at its first call."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def contrastive_options(
    use: str, aggregate: str, normalize: str, on_missing: str, on_unavailable: str
) -> dict[str, str] | None:
    """The request's ``contrastive`` field: None for raw rewards (baselines skipped).

    ``on_unavailable`` is always sent, never left to the service's default: what a store
    outage does to a reward must be the adapter's decision, the same on every replica.
    """
    check_choice("use", use, USES)
    check_choice("normalize", normalize, NORMALIZES)
    check_choice("on_missing", on_missing, ON_MISSING)
    check_choice("on_unavailable", on_unavailable, ON_UNAVAILABLE)
    if use == "raw":
        return None
    return {
        "aggregate": aggregate,
        "normalize": normalize,
        "on_missing": on_missing,
        "on_unavailable": on_unavailable,
    }


def is_unavailable(result: RewardResult) -> bool:
    """Whether the result's baseline could not be read because the store failed."""
    return result.baseline_source == UNAVAILABLE


def is_fatal(error: RewardServiceError) -> bool:
    """Whether a failed request should stop training rather than give no reward."""
    return error.status in FATAL_STATUSES


def text_of(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts
    (``[{"type": "text", "text": ...}]``, as multimodal chat formats write it)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, Mapping):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    return str(content)


def as_prompt(prompt: Any) -> Prompt:
    """A prompt as the service takes it: a string, or messages with only role and content.

    Other keys (tool calls, names) are dropped: the service refuses unknown fields, and the
    prompt id is computed from what is sent, so it must not depend on them either.
    """
    if isinstance(prompt, str):
        return prompt
    return [
        {"role": str(message["role"]), "content": text_of(message.get("content"))}
        for message in prompt
    ]


def optional_id(value: Any) -> str | None:
    """A prompt id column's value: None stays None, anything else becomes its text."""
    return None if value is None else str(value)


class LoopClients:
    """``AsyncRewardClient``\\ s made lazily, one per key and event loop, and reused.

    A client belongs to the loop it first ran on (its connections and semaphore do), so a
    caller on another loop gets a client of its own; a loop that is garbage collected takes
    its clients with it. Safe to use from several threads, each with its own loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Hashable, AsyncRewardClient]
        ] = weakref.WeakKeyDictionary()

    def get(self, key: Hashable, make: Callable[[], AsyncRewardClient]) -> AsyncRewardClient:
        """The running loop's client for ``key``, made with ``make`` the first time."""
        loop = asyncio.get_running_loop()
        with self._lock:
            clients = self._by_loop.setdefault(loop, {})
            client = clients.get(key)
            if client is None:
                client = clients[key] = make()
            return client

    async def aclose(self) -> None:
        """Close the running loop's clients (those of other loops stay theirs to close)."""
        with self._lock:
            clients = self._by_loop.pop(asyncio.get_running_loop(), {})
        for client in clients.values():
            await client.aclose()
