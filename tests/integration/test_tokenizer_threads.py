"""The service tokenizes several requests at once on one tokenizer. Some transformers and
tokenizers releases fail there ("Already borrowed") or would mix states: guard against both."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.scoring.model import load_reward_model
from service.scoring.types import RewardInput
from service.settings import Settings
from tests.models import mixed_items


@pytest.mark.parametrize("arch", ["tiny_llama", "minilm_rm"])
def test_concurrent_encodes_match_sequential_ones(
    request: pytest.FixtureRequest, arch: str
) -> None:
    model_dir: Path = request.getfixturevalue(arch)
    formatter = load_reward_model(model_dir, Settings(truncation="left")).formatter
    batches = [
        [RewardInput(prompt=i["prompt"], response=i["response"]) for i in mixed_items(16, seed=s)]
        for s in range(64)
    ]
    expected = [formatter.encode(batch, "left") for batch in batches]
    with ThreadPoolExecutor(8) as pool:
        # Alternating truncation modes makes the tokenizer reconfigure itself between calls.
        results = list(pool.map(formatter.encode, batches, ["left", "none"] * (len(batches) // 2)))
    assert results == expected
