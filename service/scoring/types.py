"""Plain data passed between the API and the scoring layer (no torch here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Prompt = str | Sequence[Mapping[str, str]]
ResolvedFormat = Literal["chat", "pair"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RewardInput:
    """One (prompt, response) pair to score. With ``text``, the input is already formatted
    (OpenRLHF sends prompt + response with the chat template applied): it is tokenized as it
    is, and prompt and response only identify it."""

    prompt: Prompt
    response: str
    text: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Encoded:
    """Token ids of one formatted item, ready to be padded into a batch."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool
    # The identity of the item's prompt as rendered: items sharing it may share the forward
    # of their common leading tokens (service/scoring/prefix.py); None shares nothing.
    prefix_key: str | None = None

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, kw_only=True, slots=True)
class Score:
    """The raw reward of one item and what was scored."""

    reward: float
    tokens: int
    truncated: bool


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What one loaded model version is; frozen so a swap can never change it under a request."""

    name: str
    version: str
    path: Path
    device: str
    dtype: str
    input_format: ResolvedFormat
    max_input_tokens: int
    label_index: int
    # Rewards are (logit - mean) / std, as OpenRLHF serves a model whose config.json says
    # normalize_reward (with its mean and std).
    normalized: bool = False


class ModelLoadError(RuntimeError):
    """A model directory that cannot serve as a reward model; the message says why."""


class InputTooLong(ValueError):
    """Items longer than the limit while truncation is off: over ``limit`` tokens
    (``lengths``), or over ``max_characters`` characters (``characters``), the latter refused
    without being tokenised."""

    def __init__(
        self,
        lengths: Mapping[int, int],
        limit: int,
        *,
        characters: Mapping[int, int] | None = None,
        max_characters: int | None = None,
    ) -> None:
        self.lengths = dict(lengths)
        self.limit = limit
        self.characters = dict(characters or {})
        self.max_characters = max_characters
        over = len(self.lengths) + len(self.characters)
        first = min([*self.lengths, *self.characters])
        if first in self.characters:
            what = (
                f"item {first} has {self.characters[first]} characters, more than "
                f"{limit} tokens can hold ({max_characters} characters)"
            )
        else:
            what = f"item {first} has {self.lengths[first]} tokens, over the limit of {limit}"
        super().__init__(
            what
            + (f" ({over} items are over)" if over > 1 else "")
            + '; shorten it or ask for "truncation": "left"'
        )


class EmptyInput(ValueError):
    """Items that render to no tokens at all (an empty formatted text): nothing to score."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = sorted(indices)
        more = f" ({len(self.indices)} items are empty)" if len(self.indices) > 1 else ""
        super().__init__(
            f"item {self.indices[0]} gives no tokens to score: its text is empty{more}"
        )


class NonFiniteReward(ArithmeticError):
    """The model gave NaN or infinity (for example an fp16 overflow): no reward to return."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = indices
        super().__init__(
            f"the model produced a non-finite reward for item(s) {indices[:8]}; "
            "try CRS_DTYPE=float32 or bfloat16"
        )
