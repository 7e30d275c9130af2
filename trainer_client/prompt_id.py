"""The one definition of a prompt's identity, shared by clients and the service (DESIGN.md 5)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

Prompt = str | Sequence[Mapping[str, str]]


def canonical_prompt(prompt: Prompt) -> str:
    """The canonical text of a prompt: the string itself, or its messages as compact JSON."""
    if isinstance(prompt, str):
        return prompt
    messages = [dict(message) for message in prompt]
    return json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prompt_id(prompt: Prompt, given: str | None = None) -> str:
    """The client's id when given, else ``sha256:<hex>`` of the canonical prompt."""
    if given is not None:
        return given
    digest = hashlib.sha256(canonical_prompt(prompt).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"
