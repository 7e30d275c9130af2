"""Prompt-prefix reuse: items of one batch that share a prompt run its tokens once.

PPO workloads score one prompt many times (GRPO's n completions, a baseline's k responses), and
prompts are often longer than responses. For a causal decoder the hidden states of the leading
tokens do not depend on what follows them, so the batch's items are grouped by their prompt
(``Encoded.prefix_key``) and within a group by the tokens they share:

1. one forward over the groups' shared prefixes (right padded) fills a key/value cache;
2. the cache is expanded to the members (the cache's own batch re-indexing);
3. one forward over the members' own tokens (right padded), at the positions they have in the
   full sequence, attends to their group's prefix through that cache.

The reward is read at the token the full forward pools at (the last one that is not the padding
id): the prefix is capped before it, so the model's own pooling over the suffix finds the same
token. Items without a group run the ordinary full forward in the same batch.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from service.scoring.grouping import (
    MIN_PREFIX_TOKENS,
    common_prefix_len,
    length_runs,
    padded_in_runs,
)
from service.scoring.types import Encoded

log = logging.getLogger("crs.prefix")

# The load-time check: how far grouped scores may be from full-forward ones, per dtype, scaled
# by the scores' magnitude when above 1. Different kernels (attention over a cache) round
# differently; an encoder's bidirectional attention differs by far more.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PROBE_PREFIX_TOKENS = (24, 40)
PROBE_SUFFIX_TOKENS = ((1, 5, 9), (3, 17))
PROBE_SEED = 0

PlainLogits = Callable[[Sequence[Encoded]], torch.Tensor]


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """Batch items (their indices) that share their first ``prefix_len`` tokens."""

    members: tuple[int, ...]
    prefix_len: int


@dataclass(frozen=True, slots=True)
class PrefixPlan:
    """How one batch runs: groups sharing a prefix, and the items that run in full."""

    groups: tuple[PrefixGroup, ...]
    plain: tuple[int, ...]


def pool_index(input_ids: Sequence[int], pad_token_id: int) -> int:
    """Where a sequence classifier reads a right-padded row's reward: its last token that is
    not the padding id (0 when every token is), as transformers' decoder classifiers do."""
    for index in range(len(input_ids) - 1, -1, -1):
        if input_ids[index] != pad_token_id:
            return index
    return 0


def plan_prefixes(
    batch: Sequence[Encoded], pad_token_id: int, min_prefix: int = MIN_PREFIX_TOKENS
) -> PrefixPlan:
    """Group items by prompt, then by their first ``min_prefix`` tokens (a left-truncated item
    of the same prompt starts otherwise); a group of two or more shares the longest prefix all
    its members have, ending before any member's pooled token, if that is ``min_prefix`` long.
    Everything else runs in full."""
    candidates: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    plain: list[int] = []
    for index, item in enumerate(batch):
        if item.prefix_key is None or item.token_type_ids is not None or item.length <= min_prefix:
            plain.append(index)
            continue
        head = (item.prefix_key, tuple(item.input_ids[:min_prefix]))
        candidates.setdefault(head, []).append(index)
    groups: list[PrefixGroup] = []
    for members in candidates.values():
        if len(members) < 2:
            plain.extend(members)
            continue
        shared = _shared_len([batch[i].input_ids for i in members], pad_token_id)
        if shared >= min_prefix:
            groups.append(PrefixGroup(members=tuple(members), prefix_len=shared))
        else:
            plain.extend(members)
    return PrefixPlan(groups=tuple(groups), plain=tuple(sorted(plain)))


def _shared_len(rows: Sequence[Sequence[int]], pad_token_id: int) -> int:
    # Capped so that every member's pooled token (hence at least one own token) is its own.
    return min(common_prefix_len(rows), *(pool_index(row, pad_token_id) for row in rows))


def planned_tokens(plan: PrefixPlan, batch: Sequence[Encoded]) -> int:
    """Tokens the grouped forward computes, padding included: the prefixes padded to the
    longest, the members' own tokens in the runs ``length_runs`` makes of them, each padded
    to its longest, the rest in full."""
    prefix = max((group.prefix_len for group in plan.groups), default=0)
    own = sorted(batch[i].length - group.prefix_len for group in plan.groups for i in group.members)
    members = padded_in_runs(own)
    plain = max((batch[i].length for i in plan.plain), default=0) * len(plan.plain)
    return len(plan.groups) * prefix + members + plain


def pays(plan: PrefixPlan, batch: Sequence[Encoded]) -> bool:
    """Whether the grouped forward computes fewer tokens than one full forward of the batch:
    prompts of different lengths can pad to more (a long prompt's prefix and a short one's
    long own part), and the batch's budget was counted for the full forward."""
    return planned_tokens(plan, batch) < len(batch) * max(item.length for item in batch)


def fits_window(plan: PrefixPlan, batch: Sequence[Encoded], window: int | None) -> bool:
    """Whether the grouped forward stays inside a sliding attention window: the cache is as
    long as the longest prefix, so a shorter prefix's suffix sits further from its prefix in
    the cache than in its own sequence, which only a window can tell apart."""
    if window is None or not plan.groups:
        return True
    longest_prefix = max(group.prefix_len for group in plan.groups)
    longest_suffix = max(
        batch[i].length - group.prefix_len for group in plan.groups for i in group.members
    )
    return longest_prefix + longest_suffix <= window


def attention_window(config: Any) -> int | None:
    """The sliding attention window a decoder config declares (None: full attention)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is None or getattr(text, "use_sliding_window", True) is False:
        return None
    return int(window)


def cache_argument(model: Any) -> str | None:
    """The name under which a model's forward takes a key/value cache (transformers 5 renamed
    ``past_key_values`` to ``cache``); None when it takes none (encoders)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def indices(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of ``values`` on ``device``, copied without waiting for the device: a
    blocking copy to a GPU would wait for the forwards queued before it."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def right_pad(
    rows: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of right-padded rows, on ``device`` (built in one call
    each, as ``pad_batch`` does)."""
    width = max(len(row) for row in rows)
    input_ids = torch.tensor(
        [list(row) + [pad_token_id] * (width - len(row)) for row in rows], dtype=torch.long
    )
    lengths = torch.tensor([len(row) for row in rows])
    attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return (
        input_ids.to(device, non_blocking=True),
        attention_mask.to(device, non_blocking=True),
    )


def grouped_logits(
    model: Any,
    batch: Sequence[Encoded],
    groups: Sequence[PrefixGroup],
    pad_token_id: int,
    device: torch.device,
    *,
    unmasked_padding: bool = False,
) -> torch.Tensor:
    """The pooled logits of the groups' members (in group, then member order): one forward
    over the prefixes, then the members' own tokens on copies of their prefix's cache, in
    runs of similar length (``length_runs``: members' own parts vary far more than prompts; a
    group's responses of 32-160 tokens padded as one are a third padding).

    With ``unmasked_padding`` (a causal model, ``RewardModel.unmasked_padding``) padding
    that comes after every real token of its row goes unmasked: the prefixes' own, and the
    members' own in a run whose prefixes are all as long (else the cache holds padding before
    a member's tokens, which must stay masked)."""
    from transformers import DynamicCache

    argument = cache_argument(model)
    if argument is None:
        raise TypeError(f"{type(model).__name__}.forward takes no key/value cache")
    prefixes = [batch[group.members[0]].input_ids[: group.prefix_len] for group in groups]
    prefix_ids, prefix_mask = right_pad(prefixes, pad_token_id, device)
    cache = DynamicCache(config=model.config)
    prefix_attention = torch.ones_like(prefix_mask) if unmasked_padding else prefix_mask
    model(
        input_ids=prefix_ids, attention_mask=prefix_attention, use_cache=True, **{argument: cache}
    )
    members = [
        _Member(owner, group.prefix_len, batch[i].input_ids[group.prefix_len :])
        for owner, group in enumerate(groups)
        for i in group.members
    ]
    order = sorted(range(len(members)), key=lambda n: len(members[n].own))
    runs = length_runs([len(members[n].own) for n in order])
    pieces = []
    for run in runs:
        chunk = [members[order[n]] for n in run]
        chunk_cache = _cache_for(cache, chunk, model.config, device)
        pieces.append(
            _members_logits(
                model,
                argument,
                chunk_cache,
                prefix_mask,
                chunk,
                pad_token_id,
                unmasked_padding=unmasked_padding,
            )
        )
    logits = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    ordered = logits.new_empty(logits.shape)
    ordered[indices(order, device)] = logits
    return ordered


@dataclass(frozen=True, slots=True)
class _Member:
    """One group member's part of the suffix forward: its group, where its own tokens start."""

    owner: int
    prefix_len: int
    own: Sequence[int]


def _cache_for(cache: Any, members: Sequence[_Member], config: Any, device: torch.device) -> Any:
    """A cache holding, per member, a copy of its group's row of the prefix cache, cut to the
    longest prefix among ``members`` (layers hold batch x heads x tokens x head size)."""
    from transformers import DynamicCache

    index = indices([m.owner for m in members], device)
    width = max(m.prefix_len for m in members)
    rows = [
        (
            layer.keys.index_select(0, index)[:, :, :width],
            layer.values.index_select(0, index)[:, :, :width],
        )
        if layer.is_initialized
        else (None, None)
        for layer in cache.layers
    ]
    return DynamicCache(ddp_cache_data=rows, config=config)


def _members_logits(
    model: Any,
    argument: str,
    cache: Any,
    prefix_mask: torch.Tensor,
    members: Sequence[_Member],
    pad_token_id: int,
    *,
    unmasked_padding: bool,
) -> torch.Tensor:
    """The pooled logits of one run of members: their own tokens, right padded, at the
    positions they have in the full sequence, attending to their prefix through ``cache``."""
    device = prefix_mask.device
    suffix_ids, suffix_mask = right_pad([m.own for m in members], pad_token_id, device)
    lengths = indices([m.prefix_len for m in members], device)
    steps = torch.arange(suffix_ids.shape[1], device=device)
    # Real tokens sit where they sit in the full sequence; padding gets position 0, which
    # every position table has (nothing real attends to it: it comes after the real tokens).
    positions = torch.where(suffix_mask.bool(), lengths[:, None] + steps[None, :], 0)
    owner = indices([m.owner for m in members], device)
    width = max(m.prefix_len for m in members)  # the cache's, see _cache_for
    attention = torch.cat([prefix_mask[owner, :width], suffix_mask], dim=1)
    if unmasked_padding and len({m.prefix_len for m in members}) == 1:
        attention = torch.ones_like(attention)
    output = model(
        input_ids=suffix_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        **{argument: cache},
    )
    logits: torch.Tensor = output.logits
    return logits


def planned_logits(
    model: Any,
    batch: Sequence[Encoded],
    plan: PrefixPlan,
    plain_logits: PlainLogits,
    pad_token_id: int,
    device: torch.device,
    *,
    unmasked_padding: bool = False,
) -> torch.Tensor:
    """The pooled logits of every item of ``batch``, in its order, as ``plan`` runs them."""
    grouped = grouped_logits(
        model, batch, plan.groups, pad_token_id, device, unmasked_padding=unmasked_padding
    )
    order = [i for group in plan.groups for i in group.members]
    logits = grouped.new_empty((len(batch), grouped.shape[1]))
    logits[indices(order, device)] = grouped
    if plan.plain:
        plain = plain_logits([batch[i] for i in plan.plain])
        logits[indices(plan.plain, device)] = plain.to(logits.dtype)
    return logits


def probe_batch(vocab_size: int, avoid: frozenset[int]) -> list[Encoded]:
    """Random token sequences in groups sharing a prefix (one of them one token longer than
    the prefix), keyed as one prompt per group, and one item of its own."""
    rng = random.Random(PROBE_SEED)
    tokens = [t for t in range(vocab_size) if t not in avoid]

    def draw(count: int) -> list[int]:
        return [rng.choice(tokens) for _ in range(count)]

    batch = []
    for group, (prefix_len, suffix_lens) in enumerate(
        zip(PROBE_PREFIX_TOKENS, PROBE_SUFFIX_TOKENS, strict=True)
    ):
        prefix = draw(prefix_len)
        batch += [
            Encoded(
                input_ids=prefix + draw(n),
                token_type_ids=None,
                truncated=False,
                prefix_key=f"{group}",
            )
            for n in suffix_lens
        ]
    batch.append(Encoded(input_ids=draw(30), token_type_ids=None, truncated=False, prefix_key="x"))
    return batch


def not_a_decoder(model: Any) -> str | None:
    """Why ``model`` is no decoder-only model (None when it is one): it must take a key/value
    cache and have no separate encoder."""
    if cache_argument(model) is None:
        return f"{type(model).__name__} takes no key/value cache (not a decoder)"
    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


def probe_prefix_reuse(
    model: Any,
    plain_logits: PlainLogits,
    pad_token_id: int,
    avoid: frozenset[int],
    *,
    unmasked_padding: bool = False,
) -> str | None:
    """Why prefix reuse is not exact for ``model`` (None when it is): it must take a cache and
    score random sequences sharing a prefix as the full forward does, within the tolerance of
    its dtype, the way it will serve (``unmasked_padding`` as ``grouped_logits`` takes it).
    Any failure is a reason, never an error: the full forward always works."""
    if (reason := not_a_decoder(model)) is not None:
        return reason
    batch = probe_batch(model.get_input_embeddings().num_embeddings, avoid | {pad_token_id})
    plan = plan_prefixes(batch, pad_token_id)
    if not plan.groups:
        return "the probe batch formed no prefix group"
    # The whole batch (prompts of two lengths, some items alone) and one prompt's group alone
    # (one prompt length: with unmasked_padding, no mask at all).
    first = plan.groups[0]
    alone = replace(first, members=tuple(range(len(first.members))))
    cases = [(batch, plan), ([batch[i] for i in first.members], PrefixPlan((alone,), ()))]
    for items, items_plan in cases:
        reason = grouped_mismatch(
            model, items, items_plan, plain_logits, pad_token_id, unmasked_padding
        )
        if reason is not None:
            return reason
    return None


def grouped_mismatch(
    model: Any,
    batch: Sequence[Encoded],
    plan: PrefixPlan,
    plain_logits: PlainLogits,
    pad_token_id: int,
    unmasked_padding: bool,
) -> str | None:
    """How the grouped forward of ``batch`` differs from the full one, beyond the tolerance of
    the model's dtype (None: it does not)."""
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            full = plain_logits(batch).float()
            grouped = planned_logits(
                model,
                batch,
                plan,
                plain_logits,
                pad_token_id,
                device,
                unmasked_padding=unmasked_padding,
            )
    except Exception as exc:  # any failure means: run everything in full
        return f"the grouped forward failed: {type(exc).__name__}: {exc}"
    dtype = next(model.parameters()).dtype
    tolerance = PROBE_TOLERANCE.get(dtype, 1e-3) * max(1.0, float(full.abs().max()))
    error = float((grouped.float() - full).abs().max())
    if not error <= tolerance:  # also catches NaN
        return f"grouped scores differ from full ones by {error:.3g} (tolerance {tolerance:.3g})"
    return None
