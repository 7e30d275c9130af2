"""Turning (prompt, response) pairs into the token ids a reward model expects.

Decoder reward models are trained on chat transcripts: their input is the conversation rendered
with the tokenizer's chat template. Encoder reward models take the text pair (prompt, response).

The work per item is bounded before anything is tokenised. A tokenizer's memory grows with the
text it is given (a 30 MB prompt once took 6.7 GB), so an item is measured in characters
first: ``max_tokens * MAX_CHARS_PER_TOKEN`` characters is the most that ``max_tokens`` tokens
can plausibly stand for. Under ``truncation: none`` a longer item is refused untokenised;
under ``left`` only its tail, the part that can survive truncation, is tokenised.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from service.scoring.types import (
    EmptyInput,
    Encoded,
    InputTooLong,
    Prompt,
    ResolvedFormat,
    RewardInput,
)
from service.settings import InputFormat, Truncation
from trainer_client.prompt_id import canonical_prompt

# The most characters one token stands for in text worth scoring. Ordinary text averages 3-5
# characters per token and code with indentation under 10; vocabulary entries are rarely
# longer than 16 characters. An input averaging more than 32 characters per token is a run of
# one character (or of whitespace an encoder's normaliser drops): under "none" such an input
# is refused by its length in characters even if its tokens would fit, which the error says.
MAX_CHARS_PER_TOKEN = 32
# Left truncation keeps at most this many leading special tokens (BOS/CLS, a role marker).
MAX_HEAD_TOKENS = 4
# A cut through the text can change the tokens next to it (a word split in two): the tail that
# is kept stays this many tokens clear of the cut, so it is what full tokenisation gives.
CUT_MARGIN_TOKENS = 16
PREFIX_KEY_CHARS = 16

log = logging.getLogger("crs.formatting")


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


def input_chars(items: Sequence[RewardInput]) -> int:
    """The characters of text the items carry, before any rendering: a cheap size measure."""
    total = 0
    for item in items:
        if item.text is not None:
            total += len(item.text)
            continue
        total += len(item.response)
        if isinstance(item.prompt, str):
            total += len(item.prompt)
        else:
            total += sum(len(m["content"]) for m in item.prompt)
    return total


@dataclass(frozen=True, slots=True)
class Rendered:
    """What the tokenizer is given for one item: a text, or a text pair (encoders)."""

    text: str
    pair: str | None
    add_special: bool

    @property
    def chars(self) -> int:
        return len(self.text) + len(self.pair or "")


@dataclass(frozen=True, slots=True)
class _Tokens:
    ids: list[int]
    types: list[int] | None


class Formatter:
    """Formats and tokenizes items for one tokenizer; safe to call from worker threads."""

    def __init__(
        self,
        tokenizer: Any,
        input_format: ResolvedFormat,
        max_tokens: int,
        *,
        max_chars_per_token: int = MAX_CHARS_PER_TOKEN,
    ) -> None:
        self.tokenizer = tokenizer
        self.input_format = input_format
        self.max_tokens = max_tokens
        # Longer items are refused (truncation none) or only their tail is tokenised (left).
        self.max_chars = max_tokens * max_chars_per_token
        self._tail_chars = (max_tokens + CUT_MARGIN_TOKENS) * max_chars_per_token
        self._head_chars = MAX_HEAD_TOKENS * max_chars_per_token
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._with_token_types = "token_type_ids" in tokenizer.model_input_names
        self._backend = fast_backend(tokenizer)

    def encode(self, items: Sequence[RewardInput], truncation: Truncation) -> list[Encoded]:
        """Token ids per item; over-long items are cut from the left or refused.

        Raises:
            EmptyInput: an item renders to no tokens at all.
            InputTooLong: under ``truncation: none``, an item over ``max_tokens`` tokens or
                over ``max_chars`` characters (the latter refused without tokenising).
        """
        if not items:
            return []
        rendered = [self.render(item) for item in items]
        small = [i for i, r in enumerate(rendered) if r.chars <= self.max_chars]
        big = [i for i, r in enumerate(rendered) if r.chars > self.max_chars]
        tokens = dict(zip(small, self._tokenize([rendered[i] for i in small]), strict=True))
        if empty := [i for i in small if not tokens[i].ids]:
            raise EmptyInput(empty)
        too_long = {i: len(tokens[i].ids) for i in small if len(tokens[i].ids) > self.max_tokens}
        if truncation == "none" and (too_long or big):
            raise InputTooLong(
                too_long,
                self.max_tokens,
                characters={i: rendered[i].chars for i in big},
                max_characters=self.max_chars,
            )
        encoded = {i: self._fit(tokens[i]) if i in too_long else _plain(tokens[i]) for i in small}
        encoded |= {i: self._fit_tail(rendered[i]) for i in big}
        if empty := [i for i in big if not encoded[i].input_ids]:
            raise EmptyInput(empty)
        return [
            replace(encoded[i], prefix_key=self.prefix_key(item)) for i, item in enumerate(items)
        ]

    def prefix_key(self, item: RewardInput) -> str:
        """The identity of the item's prompt as this formatter renders it: items with the same
        prompt rendered by the same rule share it (an already formatted ``text`` item is keyed
        by its prompt too, apart from rendered ones). It only proposes items whose forwards
        may share their leading tokens; the tokens themselves decide what is shared."""
        rule = "text" if item.text is not None else self.input_format
        canonical = f"{rule}\0{canonical_prompt(item.prompt)}"
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:PREFIX_KEY_CHARS]

    def render(self, item: RewardInput) -> Rendered:
        """The text(s) the tokenizer gets for an item, and whether it adds special tokens."""
        if item.text is not None:
            return self._render_text(item.text)
        if self.input_format == "chat":
            text = self.tokenizer.apply_chat_template(
                conversation(item.prompt, item.response), tokenize=False
            )
            # The template already wrote BOS and friends: adding them again shifts every score.
            return Rendered(text, None, add_special=False)
        return Rendered(prompt_text(item.prompt), item.response, add_special=True)

    def _render_text(self, text: str) -> Rendered:
        """An already formatted input, one sequence. A chat template wrote its own special
        tokens into the text; other models get theirs added (CLS ... SEP) unless the text
        already starts with the start token (a template wrote it)."""
        if self.input_format == "chat":
            return Rendered(text, None, add_special=False)
        start = self.tokenizer.cls_token or self.tokenizer.bos_token
        return Rendered(text, None, add_special=not (start and text.startswith(start)))

    def _tokenize(self, rendered: Sequence[Rendered]) -> list[_Tokens]:
        """Token ids (and token types, for models that take them) of each rendering, with one
        tokenizer call per kind of rendering."""
        out: list[_Tokens | None] = [None] * len(rendered)
        kinds = {(r.pair is not None, r.add_special) for r in rendered}
        for with_pair, add_special in sorted(kinds):
            rows = [
                i
                for i, r in enumerate(rendered)
                if (r.pair is not None, r.add_special) == (with_pair, add_special)
            ]
            texts = [rendered[i].text for i in rows]
            pairs = [rendered[i].pair or "" for i in rows] if with_pair else None
            for i, tokens in zip(rows, self._call(texts, pairs, add_special), strict=True):
                out[i] = tokens
        return [t for t in out if t is not None]

    def _call(self, texts: list[str], pairs: list[str] | None, add_special: bool) -> list[_Tokens]:
        """One tokenizer call: through the fast backend where there is one (``fast_backend``),
        else the tokenizer's own. Token types are always given when the model takes them: a
        batch may mix pairs and texts, and the padded batch carries types only if its first
        item has them."""
        if self._backend is not None:
            inputs = texts if pairs is None else list(zip(texts, pairs, strict=True))
            encodings = self._backend.encode_batch_fast(inputs, add_special_tokens=add_special)
            with_types = self._with_token_types
            return [_Tokens(e.ids, e.type_ids if with_types else None) for e in encodings]
        batch = self.tokenizer(
            texts,
            pairs,
            add_special_tokens=add_special,
            return_token_type_ids=self._with_token_types,
        )
        types = batch.get("token_type_ids") if self._with_token_types else None
        return [
            _Tokens(list(ids), list(types[n]) if types else None)
            for n, ids in enumerate(batch["input_ids"])
        ]

    def _head_count(self, ids: Sequence[int]) -> int:
        """How many leading special tokens (BOS/CLS and friends) left truncation keeps."""
        head, most = 0, min(MAX_HEAD_TOKENS, self.max_tokens // 2)
        while head < most and head < len(ids) and ids[head] in self._special_ids:
            head += 1
        return head

    def _fit(self, tokens: _Tokens) -> Encoded:
        # Left truncation keeps the leading special tokens (BOS/CLS) and the end of the input:
        # the end of the prompt and the response, which is what the reward is about.
        ids, types = tokens.ids, tokens.types
        head = self._head_count(ids)
        tail = self.max_tokens - head
        return Encoded(
            input_ids=ids[:head] + ids[len(ids) - tail :],
            token_type_ids=None if types is None else types[:head] + types[len(types) - tail :],
            truncated=True,
        )

    def _fit_tail(self, rendered: Rendered) -> Encoded:
        """Left truncation of an item over ``max_chars``, tokenising only its head and its
        tail: the same tokens as ``_fit`` of the whole item whenever the tail holds at least
        ``max_tokens + CUT_MARGIN_TOKENS`` tokens (ordinary text, see MAX_CHARS_PER_TOKEN;
        otherwise the tail's tokens are all it gets)."""
        head_piece, tail_piece = self._head_piece(rendered), self._tail_piece(rendered)
        head_tokens, tail_tokens = self._tokenize([head_piece, tail_piece])
        head = self._head_count(head_tokens.ids)
        # The tail's own leading special tokens (CLS added to the cut) are not part of it.
        available = len(tail_tokens.ids) - self._head_count(tail_tokens.ids)
        keep = min(self.max_tokens - head, available)
        ids, types = tail_tokens.ids, tail_tokens.types
        return Encoded(
            input_ids=head_tokens.ids[:head] + ids[len(ids) - keep :],
            token_type_ids=None
            if types is None or head_tokens.types is None
            else head_tokens.types[:head] + types[len(types) - keep :],
            truncated=True,
        )

    def _head_piece(self, rendered: Rendered) -> Rendered:
        """Enough of the start to hold the leading special tokens."""
        pair = None if rendered.pair is None else rendered.pair[: self._head_chars]
        return replace(rendered, text=rendered.text[: self._head_chars], pair=pair)

    def _tail_piece(self, rendered: Rendered) -> Rendered:
        """The last ``_tail_chars`` characters: of the response first, then of the prompt."""
        budget = self._tail_chars
        if rendered.pair is None:
            return replace(rendered, text=rendered.text[-budget:])
        pair = rendered.pair[-budget:]
        rest = budget - len(pair)
        text = rendered.text[max(0, len(rendered.text) - rest) :] if rest > 0 else ""
        return replace(rendered, text=text, pair=pair)


def fast_backend(tokenizer: Any) -> Any | None:
    """A copy of a fast tokenizer's Rust backend, set as the tokenizer's own call sets it for
    this formatter (no truncation, no padding, its ``split_special_tokens``), whose
    ``encode_batch_fast`` gives the same tokens at half the CPU of a call through the
    tokenizer for one item (no offsets, none of the wrapper's per-call work). A copy, so that
    calls from several threads never see it change. None without one (a Python tokenizer) or
    where it cannot be copied (a custom Python component does not serialise): the tokenizer's
    own call then serves."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    from tokenizers import Tokenizer

    try:
        own = Tokenizer.from_str(backend.to_str())
    except Exception as exc:  # any failure: tokenise through the tokenizer's own call
        log.info(
            "tokenizing through the tokenizer's own call: its backend cannot be copied (%s)", exc
        )
        return None
    own.no_truncation()
    own.no_padding()
    own.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return own


def _plain(tokens: _Tokens) -> Encoded:
    return Encoded(input_ids=tokens.ids, token_type_ids=tokens.types, truncated=False)
