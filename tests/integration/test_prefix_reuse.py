"""Prompt-prefix reuse scores as the full forward does, on real tiny decoders."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.scoring.grouping import MIN_PREFIX_TOKENS, length_runs
from service.scoring.model import RewardModel, identify_model, load_reward_model
from service.scoring.prefix import (
    PrefixPlan,
    attention_window,
    fits_window,
    pays,
    plan_prefixes,
    planned_logits,
    planned_tokens,
)
from service.scoring.types import Encoded, RewardInput
from service.settings import Settings
from tests.models import sentence

TOLERANCE = 1e-4
DECODERS = ["tiny_llama", "tiny_gpt2"]


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request: pytest.FixtureRequest) -> RewardModel:
    path: Path = request.getfixturevalue(request.param)
    return load_reward_model(path, Settings(device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def llama(tiny_llama: Path) -> RewardModel:
    return load_reward_model(tiny_llama, Settings(device="cpu", dtype="float32"))


def full_forward(model: RewardModel, batch: list[Encoded]) -> list[float]:
    """Today's path: one full forward over the right-padded batch."""
    return replace(model, prefix_reuse=False).forward(batch)


def grouped_forward(model: RewardModel, batch: list[Encoded]) -> list[float]:
    """The grouped path whether or not it pays for this batch."""
    plan = plan_prefixes(batch, model.pad_token_id)
    with torch.inference_mode():
        logits = planned_logits(
            model.model, batch, plan, model.plain_logits, model.pad_token_id, model.device
        )
    rewards: list[float] = logits[:, model.info.label_index].float().tolist()
    return rewards


def tokens(rng: random.Random, model: RewardModel, count: int) -> list[int]:
    """Random ordinary token ids (no special ones, no padding)."""
    special = set(model.formatter.tokenizer.all_special_ids) | {model.pad_token_id}
    vocab = [t for t in range(len(model.formatter.tokenizer)) if t not in special]
    return [rng.choice(vocab) for _ in range(count)]


def item(ids: list[int], key: str | None) -> Encoded:
    return Encoded(input_ids=ids, token_type_ids=None, truncated=False, prefix_key=key)


def mixed_batch(model: RewardModel) -> list[Encoded]:
    """Groups of several sizes and prefix lengths (one member with a single own token, one
    group whose members differ in length a lot), singles, and same-key items whose tokens
    diverge before the minimum prefix; interleaved, as a batch arrives."""
    rng = random.Random(3)
    long_prompt, short_prompt, wide_prompt = (tokens(rng, model, n) for n in (90, 20, 33))
    batch = [item(long_prompt + tokens(rng, model, n), "long") for n in (1, 4, 12, 30)]
    batch += [item(short_prompt + tokens(rng, model, n), "short") for n in (2, 7)]
    batch += [item(wide_prompt + tokens(rng, model, n), "wide") for n in (2, 150, 60)]
    batch += [item(tokens(rng, model, n), key) for n, key in ((25, "alone"), (40, None))]
    diverging = tokens(rng, model, 5)
    batch += [item(diverging + tokens(rng, model, 30), "early") for _ in range(2)]
    return random.Random(1).sample(batch, len(batch))


def test_mixed_batch_plan(llama: RewardModel) -> None:
    batch = mixed_batch(llama)
    plan = plan_prefixes(batch, llama.pad_token_id)
    shapes = sorted((len(g.members), g.prefix_len) for g in plan.groups)
    assert shapes == [(2, 20), (3, 33), (4, 90)]
    plain_keys = sorted(str(batch[i].prefix_key) for i in plan.plain)
    assert plain_keys == ["None", "alone", "early", "early"]
    assert fits_window(plan, batch, attention_window(llama.model.config))
    # Own parts of 1 to 150 tokens: the members run in several forwards (the tests below
    # compare what they score with the full forward's).
    own = sorted(batch[i].length - g.prefix_len for g in plan.groups for i in g.members)
    assert len(length_runs(own)) > 1


def test_grouped_path_equals_full_forward(decoder: RewardModel) -> None:
    assert decoder.prefix_reuse
    batch = mixed_batch(decoder)
    assert plan_prefixes(batch, decoder.pad_token_id).groups
    grouped = decoder.forward(batch)
    full = full_forward(decoder, batch)
    assert grouped == pytest.approx(full, abs=TOLERANCE)
    # A constant model would pass the comparison above: the rewards must differ by item.
    assert len({round(reward, 5) for reward in full}) == len(batch)


def test_rewards_come_back_in_batch_order(decoder: RewardModel) -> None:
    batch = mixed_batch(decoder)
    order = random.Random(5).sample(range(len(batch)), len(batch))
    shuffled = decoder.forward([batch[i] for i in order])
    alone = [decoder.forward([batch[i]])[0] for i in order]
    assert shuffled == pytest.approx(alone, abs=TOLERANCE)


def test_pooled_token_stays_own_when_a_response_ends_in_padding_ids(llama: RewardModel) -> None:
    # The full forward reads the last token that is not the padding id; a member whose real
    # tokens end in padding ids pools inside the shared tokens unless the prefix stops first.
    rng = random.Random(8)
    prompt = tokens(rng, llama, 40)
    pad = llama.pad_token_id
    batch = [
        item(prompt + tokens(rng, llama, 3), "p"),
        item(prompt[:30] + [pad] * 12, "p"),
        item(prompt + tokens(rng, llama, 6) + [pad, pad], "p"),
    ]
    [group] = plan_prefixes(batch, pad).groups
    assert group.prefix_len == 29
    assert llama.forward(batch) == pytest.approx(full_forward(llama, batch), abs=TOLERANCE)


GROUPS = st.lists(
    st.tuples(
        st.integers(1, 48),  # prefix tokens (some below the minimum)
        st.lists(st.integers(1, 24), min_size=1, max_size=4),  # each member's own tokens
    ),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(shapes=GROUPS, seed=st.integers(0, 2**16))
def test_random_group_shapes_score_as_full_forward(
    llama: RewardModel, shapes: list[tuple[int, list[int]]], seed: int
) -> None:
    rng = random.Random(seed)
    batch = []
    for group, (prefix_len, own) in enumerate(shapes):
        prefix = tokens(rng, llama, prefix_len)
        batch += [item(prefix + tokens(rng, llama, n), f"g{group}") for n in own]
    batch = rng.sample(batch, len(batch))
    full = full_forward(llama, batch)
    assert llama.forward(batch) == pytest.approx(full, abs=TOLERANCE)
    if plan_prefixes(batch, llama.pad_token_id).groups:
        assert grouped_forward(llama, batch) == pytest.approx(full, abs=TOLERANCE)


def test_planned_tokens_count_each_part_padded(llama: RewardModel) -> None:
    rng = random.Random(6)
    long_prompt, short_prompt = tokens(rng, llama, 50), tokens(rng, llama, 20)
    batch = [item(long_prompt + tokens(rng, llama, n), "long") for n in (3, 9)]
    batch += [item(short_prompt + tokens(rng, llama, n), "short") for n in (4, 30)]
    batch.append(item(tokens(rng, llama, 44), None))
    plan = plan_prefixes(batch, llama.pad_token_id)
    # Prefixes 2 x 50, own parts 4 x 30 (the longest), the keyless one 1 x 44.
    assert planned_tokens(plan, batch) == 2 * 50 + 4 * 30 + 44
    assert pays(plan, batch)  # a full forward pads all 5 to 59 tokens: 295


def test_planned_tokens_count_the_members_runs(llama: RewardModel) -> None:
    rng = random.Random(9)
    prompt = tokens(rng, llama, 40)
    own = (10, 12, 100, 110)
    batch = [item(prompt + tokens(rng, llama, n), "p") for n in own]
    plan = plan_prefixes(batch, llama.pad_token_id)
    # One run would pad all four to 110 (440 tokens); two runs pad 2 x 12 + 2 x 110 = 244.
    assert length_runs(sorted(own)) == [range(2), range(2, 4)]
    assert planned_tokens(plan, batch) == 40 + 2 * 12 + 2 * 110
    assert llama.forward(batch) == pytest.approx(full_forward(llama, batch), abs=TOLERANCE)


def test_computed_tokens_are_those_of_the_forward_that_runs(llama: RewardModel) -> None:
    rng = random.Random(10)
    prompt = tokens(rng, llama, 40)
    grouped = [item(prompt + tokens(rng, llama, n), "p") for n in (10, 12, 100, 110)]
    assert llama.computed_tokens(grouped) == 40 + 2 * 12 + 2 * 110
    # Without a shared prompt: runs of similar length, 2 x 30 + 2 x 150 against 4 x 150.
    lone = [item(tokens(rng, llama, n), None) for n in (150, 20, 140, 30)]
    assert llama.computed_tokens(lone) == 2 * 30 + 2 * 150
    assert llama.forward(lone) == pytest.approx(
        [llama.forward([one])[0] for one in lone], abs=TOLERANCE
    )
    off = replace(llama, prefix_reuse=False)
    assert off.computed_tokens(grouped) == 2 * 52 + 2 * 150


def test_a_batch_that_grouping_would_pad_to_more_runs_in_full(llama: RewardModel) -> None:
    # Every item has 62 tokens, but one prompt's prefix is long and the other's own parts are:
    # grouped, 2 x 60 + 4 x 46 = 304 tokens against 4 x 62 = 248 in full.
    rng = random.Random(7)
    long_prompt, short_prompt = tokens(rng, llama, 60), tokens(rng, llama, 16)
    batch = [item(long_prompt + tokens(rng, llama, 2), "long") for _ in range(2)]
    batch += [item(short_prompt + tokens(rng, llama, 46), "short") for _ in range(2)]
    plan = plan_prefixes(batch, llama.pad_token_id)
    assert len(plan.groups) == 2
    assert planned_tokens(plan, batch) == 304
    assert not pays(plan, batch)
    assert llama._prefix_plan(batch) is None
    assert llama._prefix_plan(batch[:2]) == PrefixPlan(groups=plan.groups[:1], plain=())


def grpo_items(prompts: int, n: int) -> list[RewardInput]:
    """GRPO-shaped: n responses for each prompt, chat and message-list prompts."""
    rng = random.Random(11)
    items = []
    for index in range(prompts):
        prompt: str | list[dict[str, str]] = sentence(rng, 30, 60)
        if index % 2:
            prompt = [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": prompt},
            ]
        items += [RewardInput(prompt=prompt, response=sentence(rng, 0, 12)) for _ in range(n)]
    return items


def test_formatted_grpo_batch_groups_by_prompt(decoder: RewardModel) -> None:
    batch = decoder.formatter.encode(grpo_items(3, 4), "none")
    plan = plan_prefixes(batch, decoder.pad_token_id)
    assert sorted(len(group.members) for group in plan.groups) == [4, 4, 4]
    assert all(group.prefix_len >= MIN_PREFIX_TOKENS for group in plan.groups)
    assert decoder.forward(batch) == pytest.approx(full_forward(decoder, batch), abs=TOLERANCE)


def test_prefix_key_names_the_prompt_as_rendered(llama: RewardModel) -> None:
    same = [RewardInput(prompt="What is 2 + 2?", response=r) for r in ("4", "four")]
    other = RewardInput(prompt="What is 3 + 3?", response="4")
    text = RewardInput(prompt="What is 2 + 2?", response="4", text="<s>What is 2 + 2? 4</s>")
    first, second, third, fourth = llama.formatter.encode([*same, other, text], "none")
    assert first.prefix_key is not None
    assert first.prefix_key == second.prefix_key
    assert third.prefix_key != first.prefix_key
    assert fourth.prefix_key not in (None, first.prefix_key)


def test_no_group_below_the_minimum_prefix(llama: RewardModel) -> None:
    rng = random.Random(2)
    prompt = tokens(rng, llama, MIN_PREFIX_TOKENS - 1)
    batch = [item(prompt + tokens(rng, llama, 9), "k") for _ in range(3)]
    assert plan_prefixes(batch, llama.pad_token_id) == PrefixPlan(groups=(), plain=(0, 1, 2))


def test_a_window_shorter_than_the_grouped_span_runs_in_full(llama: RewardModel) -> None:
    rng = random.Random(4)
    prompt = tokens(rng, llama, 30)
    batch = [item(prompt + tokens(rng, llama, n), "k") for n in (5, 20)]
    plan = plan_prefixes(batch, llama.pad_token_id)
    assert fits_window(plan, batch, 50)
    assert not fits_window(plan, batch, 49)


@pytest.mark.parametrize(
    ("fixture", "expected"), [*((d, True) for d in DECODERS), ("tiny_bert", False)]
)
def test_probe_decides_at_load(
    request: pytest.FixtureRequest, fixture: str, expected: bool
) -> None:
    path: Path = request.getfixturevalue(fixture)
    assert load_reward_model(path, Settings(device="cpu")).prefix_reuse is expected


def test_off_setting_turns_reuse_off(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRS_PREFIX_REUSE", "off")
    model = load_reward_model(tiny_llama, Settings(device="cpu"))
    assert model.prefix_reuse is False


def test_version_is_the_same_with_reuse_on_and_off(tiny_llama: Path) -> None:
    on = identify_model(tiny_llama, Settings(prefix_reuse="auto")).info.version
    off = identify_model(tiny_llama, Settings(prefix_reuse="off")).info.version
    assert on == off


@pytest.mark.parametrize(("window", "by_prompt"), [(None, True), (100, False), (4096, True)])
def test_batches_by_prompt_unless_a_window_could_force_full_forwards(
    llama: RewardModel, monkeypatch: pytest.MonkeyPatch, window: int | None, by_prompt: bool
) -> None:
    # The tiny llama takes 2048 tokens: a grouped batch spans at most twice that.
    assert llama.info.max_input_tokens == 2048
    monkeypatch.setattr(llama.model.config, "sliding_window", window, raising=False)
    assert llama.batches_by_prompt is by_prompt
    assert replace(llama, prefix_reuse=False).batches_by_prompt is False
