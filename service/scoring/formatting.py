"""Turning (prompt, response) pairs into the token ids a reward model expects.

Decoder reward models are trained on chat transcripts: their input is the conversation rendered
with the tokenizer's chat template. Encoder reward models take the text pair (prompt, response).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.scoring.types import Encoded, InputTooLong, Prompt, ResolvedFormat, RewardInput
from service.settings import InputFormat, Truncation


def resolve_input_format(requested: InputFormat, tokenizer: Any) -> ResolvedFormat:
    """``auto`` picks chat when the tokenizer carries a chat template, else the text pair."""
    if requested == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "pair"
    if requested == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("input format 'chat' needs a tokenizer with a chat template")
    return requested


def conversation(prompt: Prompt, response: str) -> list[dict[str, str]]:
    """The prompt as a conversation (a string becomes one user turn), answered by the response."""
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    else:
        turns = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return [*turns, {"role": "assistant", "content": response}]


def prompt_text(prompt: Prompt) -> str:
    """A message-list prompt flattened for encoders: one ``role: content`` line per message."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class Formatter:
    """Formats and tokenizes items for one tokenizer; safe to call from worker threads."""

    def __init__(self, tokenizer: Any, input_format: ResolvedFormat, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.input_format = input_format
        self.max_tokens = max_tokens
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._with_token_types = "token_type_ids" in tokenizer.model_input_names

    def encode(self, items: Sequence[RewardInput], truncation: Truncation) -> list[Encoded]:
        """Token ids per item; over-long items are cut from the left or refused."""
        if not items:
            return []
        ids, types = self._tokenize(items)
        too_long = {i: len(row) for i, row in enumerate(ids) if len(row) > self.max_tokens}
        if too_long and truncation == "none":
            raise InputTooLong(too_long, self.max_tokens)
        return [
            self._fit(row, types[i] if types else None)
            if i in too_long
            else Encoded(input_ids=row, token_type_ids=types[i] if types else None, truncated=False)
            for i, row in enumerate(ids)
        ]

    def _tokenize(self, items: Sequence[RewardInput]) -> tuple[list[list[int]], list[list[int]]]:
        if any(item.text is not None for item in items):
            return self._tokenize_texts(items), []
        if self.input_format == "chat":
            texts = [
                self.tokenizer.apply_chat_template(
                    conversation(item.prompt, item.response), tokenize=False
                )
                for item in items
            ]
            # The template already wrote BOS and friends: adding them again shifts every score.
            batch = self.tokenizer(texts, add_special_tokens=False, return_token_type_ids=False)
            return batch["input_ids"], []
        batch = self.tokenizer(
            [prompt_text(item.prompt) for item in items],
            [item.response for item in items],
            add_special_tokens=True,
            return_token_type_ids=self._with_token_types,
        )
        return batch["input_ids"], batch.get("token_type_ids") or []

    def _tokenize_texts(self, items: Sequence[RewardInput]) -> list[list[int]]:
        """Already formatted inputs, one sequence each. A chat template wrote its own special
        tokens into the text; other models get theirs added (CLS ... SEP)."""
        if any(item.text is None for item in items):
            raise ValueError("a batch mixes formatted texts and (prompt, response) pairs")
        texts = [item.text or "" for item in items]
        add_special = self.input_format != "chat"
        batch = self.tokenizer(texts, add_special_tokens=add_special, return_token_type_ids=False)
        ids: list[list[int]] = batch["input_ids"]
        return ids

    def _fit(self, ids: list[int], types: list[int] | None) -> Encoded:
        # Left truncation keeps the leading special tokens (BOS/CLS) and the end of the input:
        # the end of the prompt and the response, which is what the reward is about.
        head, most = 0, min(4, self.max_tokens // 2)
        while head < most and ids[head] in self._special_ids:
            head += 1
        tail = self.max_tokens - head
        return Encoded(
            input_ids=ids[:head] + ids[len(ids) - tail :],
            token_type_ids=None if types is None else types[:head] + types[len(types) - tail :],
            truncated=True,
        )
