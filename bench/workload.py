"""Deterministic benchmark items whose lengths are measured in the model's own tokens.

Two shapes:

- ``make_items`` (the PPO shape): every item has a prompt of its own, uniform in 64-512 tokens,
  and a response uniform in 32-512 tokens, as PPO rollouts of a chat model roughly are;
- ``make_grpo_items`` (the GRPO shape): P prompts of 256-512 tokens, each answered by n
  completions of 32-160 tokens (on average the prompt is 4x as long as a response), as GRPO
  samples n completions per prompt and scores them together.

Text is drawn from a fixed word list; each word's token cost is measured once, texts are
assembled to the target cost, then tokenized in one batch and corrected word by word until every
count is within a few tokens of its target.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

PROMPT_TOKENS = (64, 512)
RESPONSE_TOKENS = (32, 512)
# GRPO: the mean prompt (384) is 4x the mean response (96).
GRPO_PROMPT_TOKENS = (256, 512)
GRPO_RESPONSE_TOKENS = (32, 160)
TOLERANCE = 2
MAX_ROUNDS = 20

# Common English words and words of the tiny tokenizer's corpus, lower case, no punctuation.
WORD_TEXT = """
    the of and to in is it that for on with as was at by be this are from or have an they which
    one you were her all she there would their we him been has when who will more no if out so
    said what up its about into than them can only other new some could time these two may then
    do first any my now such like our over man me even most made after also did many before must
    through back years where much your way well down should because each just those people how
    too little state good very make world still own see men work long get here between both life
    being under never day same another know while last might us great old year off come since
    against go came right used take three water energy light plants capital france paris ocean
    night poem market report rose tuesday solve divide subtract return sorry request tips sleep
    schedule avoid screens relax empire centuries decline boils degrees celsius level explain
    neural network learns data reward model assigns score response prompt apples oranges bananas
    meeting monday march mountain meters border translate morning spanish park agreed exercise
    vegetables drink mitochondria powerhouse cell astronauts moon recursion function smaller
    input team match thrilling half flour sugar eggs butter bake minutes interest rates inflation
    economic policy plays train leaves arrives tickets sky blue sunlight scatters molecules air
    jazz music blues library opens closes sundays helpful honest harmless rate dogs cats horses
    rabbits animals matrix parallel quickly summarize article sentences question explanation
    volcanoes magma cracks crust colours doctor recommended rest fluids visit week chess defence
"""
WORDS: tuple[str, ...] = tuple(WORD_TEXT.split())


def make_items(
    tokenizer: Any,
    count: int,
    *,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
    response_tokens: tuple[int, int] = RESPONSE_TOKENS,
    tolerance: int = TOLERANCE,
) -> list[dict[str, str]]:
    """``count`` items ``{"prompt", "response"}``; the same seed and tokenizer give the same items.

    Lengths count the text's own tokens (no special tokens, no chat template).
    """
    rng = random.Random(seed)
    prompt_targets = [rng.randint(*prompt_tokens) for _ in range(count)]
    response_targets = [rng.randint(*response_tokens) for _ in range(count)]
    writer = TextWriter(tokenizer, rng, tolerance)
    prompts = writer.texts(prompt_targets)
    responses = writer.texts(response_targets)
    return [
        {"prompt": prompt, "response": response}
        for prompt, response in zip(prompts, responses, strict=True)
    ]


def make_grpo_items(
    tokenizer: Any,
    prompts: int,
    completions: int,
    *,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = GRPO_PROMPT_TOKENS,
    response_tokens: tuple[int, int] = GRPO_RESPONSE_TOKENS,
    tolerance: int = TOLERANCE,
) -> list[dict[str, str]]:
    """``prompts * completions`` items, prompt by prompt: item ``p * completions + j`` is the
    j-th completion of prompt p, every completion a different text. The same seed and tokenizer
    give the same items."""
    rng = random.Random(seed)
    prompt_targets = [rng.randint(*prompt_tokens) for _ in range(prompts)]
    response_targets = [rng.randint(*response_tokens) for _ in range(prompts * completions)]
    writer = TextWriter(tokenizer, rng, tolerance)
    prompt_texts = writer.texts(prompt_targets)
    responses = writer.texts(response_targets)
    return [
        {"prompt": prompt_texts[index // completions], "response": response}
        for index, response in enumerate(responses)
    ]


def length_stats(tokenizer: Any, items: Sequence[dict[str, str]]) -> dict[str, float]:
    """Mean prompt and response tokens over the items (a prompt counts once per item that
    carries it) and their ratio, as measured by the tokenizer."""
    prompts = token_counts(tokenizer, [item["prompt"] for item in items])
    responses = token_counts(tokenizer, [item["response"] for item in items])
    prompt_mean = sum(prompts) / len(prompts) if prompts else 0.0
    response_mean = sum(responses) / len(responses) if responses else 0.0
    return {
        "prompt_tokens_mean": round(prompt_mean, 1),
        "response_tokens_mean": round(response_mean, 1),
        "prompt_to_response_ratio": round(prompt_mean / response_mean, 2) if response_mean else 0.0,
    }


def token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text alone, without special tokens."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(row) for row in ids]


class TextWriter:
    """Assembles word lists of a target token cost for one tokenizer."""

    def __init__(self, tokenizer: Any, rng: random.Random, tolerance: int) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        self.tolerance = tolerance
        # A word inside a text is preceded by a space; its cost is that of " word".
        costs = token_counts(tokenizer, [f" {word}" for word in WORDS])
        self.cost = dict(zip(WORDS, costs, strict=True))
        self.cheapest = min(WORDS, key=self.cost.__getitem__)

    def texts(self, targets: Sequence[int]) -> list[str]:
        """One text per target, each within ``tolerance`` tokens of it when reachable."""
        words = [self.extend([], target) for target in targets]
        for _ in range(MAX_ROUNDS):
            counts = token_counts(self.tokenizer, [" ".join(row) for row in words])
            off = [i for i, n in enumerate(counts) if abs(n - targets[i]) > self.tolerance]
            if not off:
                break
            for i in off:
                words[i] = self.correct(words[i], counts[i] - targets[i])
        return [" ".join(row) for row in words]

    def extend(self, words: list[str], deficit: int) -> list[str]:
        """Append words until their estimated cost covers ``deficit`` without overshooting."""
        while deficit > self.tolerance:
            word = self.rng.choice(WORDS)
            if self.cost[word] > deficit:
                word = self.cheapest
            words.append(word)
            deficit -= self.cost[word]
        return words

    def correct(self, words: list[str], excess: int) -> list[str]:
        """Drop words from the end while the text is too long, then refill if it got too short."""
        words = list(words)
        while excess > self.tolerance and len(words) > 1:
            excess -= self.cost[words.pop()]
        return self.extend(words, -excess)
