"""Right-padded batches run without their padding mask only where that scores alike.

A causal decoder cannot attend from a real token to the padding after it, so its scores are
the same with or without the mask (and SDPA takes a faster kernel without); an encoder's are
not. The load-time probe decides; these tests check it on real tiny models of each family.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.scoring.model import RewardModel, load_reward_model, probe_unmasked_padding
from service.scoring.prefix import plan_prefixes
from service.scoring.types import Encoded, RewardInput
from service.settings import Settings

DECODERS = ["tiny_llama", "tiny_gpt2"]
FP32_TOLERANCE = 1e-6


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request: pytest.FixtureRequest) -> RewardModel:
    path: Path = request.getfixturevalue(request.param)
    return load_reward_model(path, Settings(device="cpu", dtype="float32", prefix_reuse="off"))


def random_batch(model: RewardModel, lengths: list[int], seed: int) -> list[Encoded]:
    rng = random.Random(seed)
    special = set(model.formatter.tokenizer.all_special_ids) | {model.pad_token_id}
    vocab = [t for t in range(len(model.formatter.tokenizer)) if t not in special]
    return [
        Encoded(
            input_ids=[rng.choice(vocab) for _ in range(n)], token_type_ids=None, truncated=False
        )
        for n in lengths
    ]


def masked(model: RewardModel, batch: list[Encoded]) -> list[float]:
    return replace(model, unmasked_padding=False).forward(batch)


@pytest.mark.parametrize(
    ("fixture", "expected"), [*((d, True) for d in DECODERS), ("tiny_bert", False)]
)
def test_probe_decides_at_load(
    request: pytest.FixtureRequest, fixture: str, expected: bool
) -> None:
    path: Path = request.getfixturevalue(fixture)
    assert load_reward_model(path, Settings(device="cpu")).unmasked_padding is expected


def test_a_padded_batch_scores_as_with_its_mask(decoder: RewardModel) -> None:
    assert decoder.unmasked_padding
    batch = random_batch(decoder, [1, 7, 150, 40, 2, 99], seed=4)
    unmasked = decoder.forward(batch)
    assert unmasked == pytest.approx(masked(decoder, batch), abs=FP32_TOLERANCE)
    # Each item alone (no padding at all) agrees too; and the rewards differ by item, so a
    # constant model could not pass.
    alone = [decoder.forward([item])[0] for item in batch]
    assert unmasked == pytest.approx(alone, abs=1e-5)
    assert len({round(reward, 5) for reward in unmasked}) == len(batch)


@pytest.fixture(scope="module")
def llama(tiny_llama: Path) -> RewardModel:
    return load_reward_model(tiny_llama, Settings(device="cpu", dtype="float32"))


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(lengths=st.lists(st.integers(1, 120), min_size=2, max_size=8), seed=st.integers(0, 2**16))
def test_random_padded_batches_score_as_with_their_mask(
    llama: RewardModel, lengths: list[int], seed: int
) -> None:
    batch = random_batch(llama, lengths, seed)
    assert llama.forward(batch) == pytest.approx(masked(llama, batch), abs=FP32_TOLERANCE)


@pytest.mark.parametrize("prefix_lengths", [(60, 60, 60), (60, 25, 90)], ids=["same", "mixed"])
def test_grouped_batches_score_as_the_masked_full_forward(
    tiny_llama: Path, prefix_lengths: tuple[int, ...]
) -> None:
    # Prefixes all as long run with no mask at all; of mixed lengths, the cache's padding
    # stays masked. Either way the scores are the masked full forward's.
    model = load_reward_model(tiny_llama, Settings(device="cpu", dtype="float32"))
    assert model.unmasked_padding
    assert model.prefix_reuse
    rng = random.Random(9)
    batch = []
    for group, prefix_len in enumerate(prefix_lengths):
        [prefix] = random_batch(model, [prefix_len], seed=group)
        for own in random_batch(model, [3, 17, 40][: 2 + group % 2], seed=rng.randrange(99)):
            ids = prefix.input_ids + own.input_ids
            batch.append(
                Encoded(input_ids=ids, token_type_ids=None, truncated=False, prefix_key=str(group))
            )
    assert plan_prefixes(batch, model.pad_token_id).groups
    full = replace(model, prefix_reuse=False, unmasked_padding=False).forward(batch)
    assert model.forward(batch) == pytest.approx(full, abs=1e-5)
    assert len({round(reward, 5) for reward in full}) == len(batch)


def test_an_encoder_keeps_the_mask_which_it_needs(tiny_bert: Path) -> None:
    model = load_reward_model(tiny_bert, Settings(device="cpu", dtype="float32"))
    assert not model.unmasked_padding
    reason = probe_unmasked_padding(model.model, model.pad_token_id, frozenset())
    assert reason is not None
    assert "not a decoder" in reason
    # The mask matters to it: without, the padding changes the shorter items' scores.
    pairs = [("Rate this.", "short one"), ("Rate this.", "a much longer answer " * 6)]
    inputs = [RewardInput(prompt=prompt, response=response) for prompt, response in pairs]
    batch = model.formatter.encode(inputs, "none")
    unmasked = replace(model, unmasked_padding=True).forward(batch)
    assert unmasked[0] != pytest.approx(model.forward(batch)[0], abs=FP32_TOLERANCE)


class ReadsTheMask(torch.nn.Module):
    """A decoder whose score also counts its attention mask: the probe must see it."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self) -> Any:
        return self.inner.get_input_embeddings()

    def forward(self, input_ids: Any, attention_mask: Any, past_key_values: Any = None) -> Any:
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(logits=logits + attention_mask.sum(1, keepdim=True) * 0.01)


def test_a_decoder_whose_scores_read_the_mask_keeps_it(tiny_llama: Path) -> None:
    model = load_reward_model(tiny_llama, Settings(device="cpu", dtype="float32"))
    reason = probe_unmasked_padding(ReadsTheMask(model.model), model.pad_token_id, frozenset())
    assert reason is not None
    assert "differ" in reason
