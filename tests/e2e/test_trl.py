"""TRL's GRPOTrainer trains a tiny policy for two steps on CPU with crs contrastive rewards from
a real `crs-service serve`: the rewards TRL logs are the ones crs gave for its completions, and
during a baseline store outage TRL leaves the crs rewards out (None) and trains on the rest."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainer_client import RewardClient
from trainer_client.adapters.trl import contrastive_reward_func
from trainer_client.launch import RedisProcess, ServiceProcess
from trainer_client.tiny_policy import build_tiny_policy

TOLERANCE = 1e-4
NUM_GENERATIONS = 2

PROMPTS: list[dict[str, Any]] = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}], "prompt_id": "q0"},
    {
        "prompt": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Write a haiku about rain."},
        ],
        "prompt_id": "q1",
    },
    {"prompt": [{"role": "user", "content": "Why is the sky blue?"}], "prompt_id": "q2"},
    {"prompt": [{"role": "user", "content": "Name three animals."}], "prompt_id": "q3"},
]

PROMPT_OF = {row["prompt_id"]: row["prompt"] for row in PROMPTS}

# What an SFT policy might have answered: each prompt's frozen baseline.
BASELINES = [
    {**row, "responses": [f"answer {n} to {row['prompt_id']}" for n in range(3)]} for row in PROMPTS
]


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_llama) as running:
        running.wait_ready()
        with RewardClient(running.url) as client:
            pushed = client.push_baselines(BASELINES)
        assert pushed.stored == len(BASELINES)
        yield running


@pytest.fixture(scope="module")
def policy(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The reward model's tokenizer: it has a chat template, and no subprocess is needed.
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "p", tokenizer_dir=tiny_llama)


@dataclass
class Call:
    """One call TRL made to the reward function, and what it got back."""

    prompts: list[Any]
    completions: list[Any]
    prompt_ids: list[Any] | None
    rewards: list[float | None]


def direct_contrastive(url: str, call: Call) -> list[float]:
    """The contrastive rewards of one plain request, without the adapter or the client."""
    items = [
        {"prompt": prompt, "response": completion[0]["content"], "prompt_id": pid}
        for prompt, completion, pid in zip(
            call.prompts, call.completions, call.prompt_ids or [], strict=True
        )
    ]
    body = {"items": items, "contrastive": {"on_missing": "null"}}
    response = httpx.post(f"{url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert {result["baseline_source"] for result in results} == {"cache"}
    return [result["contrastive"] for result in results]


def mean(values: Sequence[float | None]) -> float:
    numbers = [value for value in values if value is not None]
    return sum(numbers) / len(numbers)


def train(policy: Path, tmp_path: Path, crs_reward: Any, *others: Any) -> tuple[Any, list[Call]]:
    """Two GRPO steps on PROMPTS with ``crs_reward`` (recorded) and ``others``."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    calls: list[Call] = []

    async def recorded(
        prompts: list[Any], completions: list[Any], **kwargs: Any
    ) -> list[float | None]:
        rewards = await crs_reward(prompts, completions, **kwargs)
        calls.append(Call(list(prompts), list(completions), kwargs.get("prompt_id"), rewards))
        return rewards

    recorded.__name__ = crs_reward.__name__
    config = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=NUM_GENERATIONS,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=str(policy),
        reward_funcs=[recorded, *others],
        args=config,
        train_dataset=Dataset.from_list(PROMPTS),
    )
    trainer.train()
    return trainer, calls


def test_grpo_logs_the_contrastive_rewards_crs_returned(
    server: ServiceProcess, policy: Path, tmp_path: Path
) -> None:
    crs_reward = contrastive_reward_func(server.url)
    trainer, calls = train(policy, tmp_path, crs_reward)

    key = f"rewards/{crs_reward.__name__}/mean"
    logged = [entry[key] for entry in trainer.state.log_history if key in entry]
    assert len(calls) == len(logged) == 2
    assert logged == pytest.approx([mean(call.rewards) for call in calls], abs=TOLERANCE)
    coverage = f"{crs_reward.__name__}/baseline_found"
    assert [entry[coverage] for entry in trainer.state.log_history if key in entry] == [1.0, 1.0]
    for call in calls:
        assert len(call.completions) == 4
        assert call.prompt_ids is not None
        # The dataset's prompt_id column came along, row by row.
        assert [PROMPT_OF[pid] for pid in call.prompt_ids] == call.prompts
        assert None not in call.rewards  # every prompt has a baseline
        assert call.rewards == pytest.approx(direct_contrastive(server.url, call), abs=TOLERANCE)


def length(completions: list[Any], **kwargs: Any) -> list[float]:
    """A second reward function, which an outage of crs's store does not touch."""
    return [float(len(completion[0]["content"])) for completion in completions]


def test_grpo_skips_the_crs_rewards_of_a_store_outage(
    tiny_llama: Path, policy: Path, tmp_path: Path
) -> None:
    with (
        RedisProcess(tmp_path / "redis") as dying,
        ServiceProcess(tiny_llama, env={"CRS_REDIS_URL": dying.url}) as outage,
    ):
        outage.wait_ready()
        with RewardClient(outage.url) as client:
            assert client.push_baselines(BASELINES).stored == len(BASELINES)
        dying.kill()
        # on_missing raw: the setting under which an outage used to give raw rewards.
        crs_reward = contrastive_reward_func(outage.url, on_missing="raw")
        trainer, calls = train(policy, tmp_path, crs_reward, length)
    assert len(calls) == 2
    assert all(call.rewards == [None] * 4 for call in calls)
    key = f"rewards/{crs_reward.__name__}/mean"
    steps = [entry for entry in trainer.state.log_history if key in entry]
    assert len(steps) == 2
    for entry in steps:
        # TRL left the crs rewards out (no mean: it logs None), and the other function's
        # reward is the whole reward.
        assert entry[key] is None
        assert entry["reward"] == pytest.approx(entry["rewards/length/mean"], abs=TOLERANCE)
