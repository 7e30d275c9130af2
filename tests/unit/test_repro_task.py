"""The gold-reward task of the reproduction: the gold reward's properties, the SFT text and the
prompts, the preference pairs and their label noise."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_client.repro.task import (
    GoldTask,
    PreferencePair,
    Topic,
    WordRole,
    default_task,
    flip_labels,
)

TASK = default_task()
PROMPT = "describe the sea"  # target length 10


def by_value(task: GoldTask, words: tuple[str, ...]) -> list[str]:
    values = dict(task.word_values)
    return sorted(words, key=lambda w: -values[w])


def sea_words() -> list[str]:
    topic = TASK.topic_of(PROMPT)
    assert topic is not None
    return by_value(TASK, topic.words)


def tiny_task() -> GoldTask:
    return GoldTask(
        topics=(Topic(name="sea", words=("waves", "salt")), Topic(name="city", words=("bus",))),
        generic_words=("good",),
        function_words=("the",),
        word_values=(("waves", 0.4), ("salt", -0.2), ("bus", 1.0), ("good", 0.5)),
    )


def test_gold_reward_computed_by_hand() -> None:
    # T = 6 ("briefly"), n = 5. content = 0.3 * ((1 + 0.5*0.4) + (1 + 0.5*-0.2) + 0 + 0.6*0.5)
    # = 0.3 * 2.4 = 0.72; "waves" once too often: repetition 0.5; raw = 0.72 - 0.5 - 0.4.
    parts = tiny_task().gold_breakdown("describe the sea briefly", "waves waves salt the good")
    assert parts.content == pytest.approx(0.72)
    assert parts.repetition == pytest.approx(0.5)
    assert parts.over_length == 0
    assert parts.short == 0
    assert parts.raw == pytest.approx(-0.18)
    assert parts.gold == pytest.approx(3 * math.tanh(-0.06))


def test_off_topic_unknown_over_length_and_short_by_hand() -> None:
    task = tiny_task()
    # "bus" is the city's: -0.25 + 0.25*1.0 = 0; "zzz" is unknown: -1. n = 8 > T = 6 by 2.
    parts = task.gold_breakdown("describe the sea briefly", "bus zzz the the the good salt waves")
    assert parts.content == pytest.approx(0.3 * (0.0 - 1.0 + 0.3 + 0.9 + 1.2))
    assert parts.repetition == pytest.approx(0.5)  # "the" is allowed twice
    assert parts.over_length == pytest.approx(1.0)
    # Empty: content 0, three words short of the minimum.
    empty = task.gold_breakdown("describe the sea", "")
    assert empty.short == pytest.approx(1.5)
    assert empty.raw == pytest.approx(-1.9)


def test_gold_reward_is_deterministic() -> None:
    response = " ".join(sea_words()[:6])
    again = default_task()
    assert again == TASK
    assert again.gold_reward(PROMPT, response) == TASK.gold_reward(PROMPT, response)
    assert default_task(seed=1).word_values != TASK.word_values


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(max_size=200), response=st.text(max_size=2000))
def test_gold_reward_is_finite_and_bounded_for_any_text(prompt: str, response: str) -> None:
    gold = TASK.gold_reward(prompt, response)
    assert math.isfinite(gold)
    assert -3.0 <= gold <= 3.0


@settings(max_examples=100, deadline=None)
@given(
    words=st.lists(st.sampled_from(TASK.words()), max_size=40),
    prompt=st.sampled_from(TASK.all_prompts()),
)
def test_gold_reward_is_bounded_for_vocabulary_text(words: list[str], prompt: str) -> None:
    assert -3.0 < TASK.gold_reward(prompt, " ".join(words)) < 3.0


def test_huge_response_is_finite() -> None:
    assert TASK.gold_reward(PROMPT, "waves " * 100_000) == pytest.approx(-3.0, abs=1e-6)


@pytest.mark.parametrize("repeated", range(4))
def test_repeating_a_word_lowers_gold(repeated: int) -> None:
    base = sea_words()[:6]
    repeat = [*base, base[repeated]]
    assert TASK.gold_reward(PROMPT, " ".join(repeat)) < TASK.gold_reward(PROMPT, " ".join(base))


def test_more_repeats_lower_gold_further() -> None:
    best = sea_words()[0]
    golds = [TASK.gold_reward(PROMPT, " ".join([best] * n)) for n in range(3, 12)]
    assert golds == sorted(golds, reverse=True)
    assert golds[-1] < -2


@pytest.mark.parametrize(
    "prompt", ["describe the sea briefly", PROMPT, "describe the sea in detail"]
)
def test_past_the_target_length_gold_falls_even_with_good_words(prompt: str) -> None:
    target = TASK.target_length(prompt)
    topic = TASK.topic_of(prompt)
    assert topic is not None
    good = by_value(TASK, topic.words) + by_value(TASK, TASK.generic_words)
    golds = [TASK.gold_reward(prompt, " ".join(good[:n])) for n in range(target, target + 6)]
    assert golds == sorted(golds, reverse=True)
    assert golds[0] > golds[-1] + 0.5


def test_length_cues_set_the_target() -> None:
    assert TASK.target_length("describe the sea briefly") == 6
    assert TASK.target_length(PROMPT) == 10
    assert TASK.target_length("describe the sea in detail") == 14
    assert TASK.target_length("anything else") == 10


def test_up_to_the_target_more_on_topic_words_raise_gold() -> None:
    golds = [TASK.gold_reward(PROMPT, " ".join(sea_words()[:n])) for n in range(1, 11)]
    assert golds == sorted(golds)


@pytest.mark.parametrize("replaced", ["good", "snow", "the", "bread"])
def test_an_on_topic_word_instead_of_another_raises_gold(replaced: str) -> None:
    words = ["waves", "the", "salt", replaced, "boat"]
    on_topic = ["waves", "the", "salt", "shore", "boat"]
    assert TASK.gold_reward(PROMPT, " ".join(on_topic)) > TASK.gold_reward(PROMPT, " ".join(words))


def test_the_same_words_are_worth_more_on_their_own_topic() -> None:
    response = " ".join(sea_words()[:6])
    assert TASK.gold_reward(PROMPT, response) > TASK.gold_reward("describe the city", response) + 1


def test_echoing_the_prompt_is_not_rewarded() -> None:
    base = " ".join(sea_words()[:5])
    assert TASK.gold_reward(PROMPT, base + " sea") < TASK.gold_reward(PROMPT, base)
    assert TASK.role("sea") is None
    assert TASK.role("the") is WordRole.FUNCTION


def sft_golds(n: int) -> list[float]:
    rng = random.Random(0)
    return [TASK.gold_reward(p, TASK.sft_response(rng, p)) for p in TASK.prompts(n, seed=0)]


def test_sft_text_is_mediocre_with_a_wide_spread() -> None:
    golds = sft_golds(1000)
    assert -0.5 < statistics.mean(golds) < 0.5
    assert statistics.pstdev(golds) > 0.5
    assert max(golds) - min(golds) > 3
    # Room for PPO: the best answer to a prompt beats nearly every SFT answer.
    best = TASK.gold_reward(PROMPT, " ".join(sea_words()))
    assert best > statistics.quantiles(golds, n=100)[98]


def test_sft_text_uses_vocabulary_words_and_sane_lengths() -> None:
    vocabulary = set(TASK.words())
    rng = random.Random(1)
    prompts = TASK.prompts(500, seed=1)
    responses = [TASK.sft_response(rng, p) for p in prompts]
    lengths = [len(r.split()) for r in responses]
    assert all(set(r.split()) <= vocabulary for r in responses)
    assert all(r == " ".join(r.split()) for r in responses)
    assert min(lengths) >= 3
    assert max(lengths) <= 16
    # Mostly under the target, where longer is better: over-long answers are rare.
    over = [len(r.split()) > TASK.target_length(p) for r, p in zip(responses, prompts, strict=True)]
    assert sum(over) < 0.25 * len(over)


def test_sft_response_is_deterministic_per_rng() -> None:
    assert TASK.sft_response(random.Random(3), PROMPT) == TASK.sft_response(
        random.Random(3), PROMPT
    )


def test_prompts_are_deterministic_per_seed() -> None:
    assert TASK.prompts(50, seed=7) == TASK.prompts(50, seed=7)
    assert TASK.prompts(50, seed=7) != TASK.prompts(50, seed=8)
    assert TASK.prompts(10, seed=7) == TASK.prompts(50, seed=7)[:10]


def test_prompts_cover_every_prompt_evenly() -> None:
    every = TASK.all_prompts()
    assert len(set(every)) == len(every) == 96
    prompts = TASK.prompts(2 * len(every), seed=0)
    assert sorted(prompts) == sorted(every * 2)
    vocabulary = set(TASK.words())
    assert all(set(p.split()) <= vocabulary for p in every)
    assert all(TASK.topic_of(p) is not None for p in every)
    with pytest.raises(ValueError, match="n must be"):
        TASK.prompts(-1, seed=0)


def test_words_are_unique() -> None:
    words = TASK.words()
    assert len(words) == len(set(words))
    assert 100 <= len(words) <= 200


def test_a_word_in_two_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="one topic or word class"):
        GoldTask(
            topics=(Topic(name="sea", words=("waves",)),),
            generic_words=("waves",),
            function_words=(),
            word_values=(("waves", 0.0),),
        )


def test_preference_pairs_are_labelled_by_gold() -> None:
    pairs = TASK.preference_pairs(300, seed=0)
    assert pairs == TASK.preference_pairs(300, seed=0)
    assert all(
        TASK.gold_reward(p.prompt, p.chosen) >= TASK.gold_reward(p.prompt, p.rejected) + 0.05
        for p in pairs
    )
    assert TASK.preference_pairs(300, seed=1) != pairs


def test_flip_labels_swaps_an_exact_nested_fraction() -> None:
    pairs = [PreferencePair(prompt="p", chosen=f"c{i}", rejected=f"r{i}") for i in range(100)]
    flipped = {
        fraction: {i for i, p in enumerate(flip_labels(pairs, fraction, seed=0)) if p != pairs[i]}
        for fraction in (0.0, 0.2, 0.4)
    }
    assert [len(flipped[f]) for f in (0.0, 0.2, 0.4)] == [0, 20, 40]
    assert flipped[0.2] < flipped[0.4]
    swapped = flip_labels(pairs, 0.4, seed=0)[min(flipped[0.4])]
    assert (swapped.chosen, swapped.rejected) == (
        pairs[min(flipped[0.4])].rejected,
        pairs[min(flipped[0.4])].chosen,
    )
    with pytest.raises(ValueError, match="flip fraction"):
        flip_labels(pairs, 1.5, seed=0)
