"""The reference PPO trainer against a real `crs-service serve`: a tiny random policy trains for
three iterations on contrastive rewards scaled by lambda, with finite losses, KL >= 0, its logs
and plot; every sample's used reward is crs's contrastive reward of that very (prompt, response)
times the logged scale, as a direct POST /v1/rewards gives it; a run stopped after two
iterations resumes at the third with the saved optimizer state, RNG and data cursor (and so
samples what the uninterrupted run sampled); samples without a baseline are dropped under
``--on-missing-baseline skip`` and fail the run under the default ``error``."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainer_client import RewardClient
from trainer_client.baselines.records import read_prompt_file
from trainer_client.cli import build_parser, main
from trainer_client.launch import ServiceProcess
from trainer_client.ppo.checkpoint import checkpoint_dir, load_checkpoint
from trainer_client.ppo.cli import config_from_args, run_train
from trainer_client.ppo.trainer import batch_prompts, prepare_run
from trainer_client.tiny_policy import build_tiny_policy

TOLERANCE = 1e-4
ITERATIONS = 3
BATCH = 4
MINIBATCH = 2
EPOCHS = 2
# Adam steps per iteration: every sample kept, EPOCHS passes of BATCH / MINIBATCH minibatches.
STEPS_PER_ITERATION = EPOCHS * BATCH // MINIBATCH

# Two prompts name their id, two leave it to crs (the trainer then sends none).
PROMPTS: list[dict[str, Any]] = [
    {"prompt": [{"role": "user", "content": "Why is the sky blue?"}], "prompt_id": "sky"},
    {"prompt": [{"role": "user", "content": "Name three animals."}], "prompt_id": "animals"},
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}]},
    {"prompt": "Write a haiku about rain."},
]
BASELINES = [
    {**row, "responses": [f"answer {n}: the reward model scores it" for n in range(3)]}
    for row in PROMPTS
]
NO_BASELINE = {"prompt": "A prompt nobody sampled baselines for.", "prompt_id": "orphan"}


@pytest.fixture(scope="module", autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """The runs here ask for one torch thread (the service needs the other core); torch's
    setting is per process, so the next tests get theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_llama) as running:
        running.wait_ready()
        with RewardClient(running.url) as client:
            assert client.push_baselines(BASELINES).stored == len(BASELINES)
        yield running


@pytest.fixture(scope="module")
def policy(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The reward model's tokenizer: it has a chat template, and no subprocess is needed.
    return build_tiny_policy(tmp_path_factory.mktemp("policy") / "p", tokenizer_dir=tiny_llama)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS)


def write_prompts(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_argv(policy: Path, prompts: Path, out: Path, url: str, *extra: str) -> list[str]:
    """The command line of `crs-trainer train` for these tests."""
    flags = [
        f"--policy={policy}",
        f"--prompts={prompts}",
        f"--out={out}",
        f"--url={url}",
        f"--batch-size={BATCH}",
        f"--minibatch-size={MINIBATCH}",
        f"--ppo-epochs={EPOCHS}",
        "--max-new-tokens=8",
        "--learning-rate=1e-3",
        "--device=cpu",
        "--torch-threads=1",
        "--quiet",
    ]
    return ["train", *flags, *extra]


def train_args(policy: Path, prompts: Path, out: Path, url: str, *extra: str) -> argparse.Namespace:
    """`crs-trainer train` as `crs-trainer` parses it."""
    return build_parser().parse_args(train_argv(policy, prompts, out, url, *extra))


def lambda_run(policy: Path, prompts: Path, out: Path, url: str, *extra: str) -> int:
    """A contrastive run under --reward-scale lambda, through `crs-trainer`'s entry point."""
    return main(
        train_argv(
            policy, prompts, out, url, "--reward=contrastive", "--reward-scale=lambda", *extra
        )
    )


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def full_run(
    server: ServiceProcess, policy: Path, prompts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    assert lambda_run(policy, prompts, out, server.url, f"--iterations={ITERATIONS}") == 0
    return out


def test_three_iterations_train_with_finite_losses_and_write_logs_and_plot(
    full_run: Path, server: ServiceProcess
) -> None:
    metrics = rows(full_run / "metrics.jsonl")
    assert [row["iteration"] for row in metrics] == [0, 1, 2]
    for row in metrics:
        for name in ("policy_loss", "value_loss", "entropy", "reward_used", "kl", "kl_k1"):
            assert math.isfinite(row[name]), (name, row)
        assert row["kl"] >= 0.0
        assert row["skipped"] == 0
        assert row["response_length"] >= 1
    # The policy starts as its reference: no KL before the first update, some after it.
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[-1]["kl"] > 0.0
    active = httpx.get(f"{server.url}/v1/models", timeout=10).json()["active"]
    active_version = active["version"] if isinstance(active, dict) else active
    assert {row["model_version"] for row in metrics} == {active_version}
    assert len(rows(full_run / "samples.jsonl")) == ITERATIONS * BATCH
    assert (full_run / "plots" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((full_run / "config.json").read_text())["reward_scale"] == "lambda"
    assert (full_run / "policy" / "config.json").is_file()


def test_used_rewards_are_crs_contrastive_rewards_times_the_logged_scale(
    full_run: Path, server: ServiceProcess
) -> None:
    samples = rows(full_run / "samples.jsonl")
    items = [
        {
            "prompt": s["prompt"],
            "response": s["response"],
            **({"prompt_id": s["prompt_id"]} if s["prompt_id"] is not None else {}),
        }
        for s in samples
    ]
    body = {"items": items, "contrastive": {"aggregate": "mean"}}
    answer = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    direct = answer.json()["results"]
    # Raw and contrastive rewards differ here (non-zero baselines): using raw ones would fail.
    assert min(abs(d["baseline"]) for d in direct) > 10 * TOLERANCE
    scales = {row["iteration"]: row["scale"] for row in rows(full_run / "metrics.jsonl")}
    for sample, expected in zip(samples, direct, strict=True):
        assert sample["baseline_source"] == expected["baseline_source"] == "cache"
        assert sample["reward"] == pytest.approx(expected["reward"], abs=TOLERANCE)
        assert sample["scale"] == scales[sample["iteration"]]
        assert 1.0 <= sample["scale"] <= 10.0
        assert sample["used"] == pytest.approx(
            sample["scale"] * expected["contrastive"], abs=TOLERANCE
        )
    # Prompt ids go out as the file gave them, and only then.
    assert {s["prompt_id"] for s in samples} <= {"sky", "animals", None}


def test_a_resumed_run_continues_the_iterations_with_the_saved_optimizer_state(
    full_run: Path, server: ServiceProcess, policy: Path, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # Plots are the full run's to show; drawing them again here would only cost time.
    assert lambda_run(policy, prompts, out, server.url, "--iterations=2", "--no-plots") == 0
    saved = load_checkpoint(checkpoint_dir(out))
    assert saved.state.iteration == 2
    assert _adam_steps(saved.optimizer) == 2 * STEPS_PER_ITERATION

    resume = [f"--iterations={ITERATIONS}", "--resume", "--no-plots"]
    restored = prepare_run(config_from_args(train_args(policy, prompts, out, server.url, *resume)))
    assert (restored.iteration, restored.cursor) == (2, 2 * BATCH)
    _assert_same(restored.optimizer.state_dict(), saved.optimizer)

    assert lambda_run(policy, prompts, out, server.url, *resume) == 0
    assert [row["iteration"] for row in rows(out / "metrics.jsonl")] == [0, 1, 2]
    final = load_checkpoint(checkpoint_dir(out))
    assert final.state.iteration == ITERATIONS
    # Adam went on counting from the saved state; a fresh optimizer would be at one iteration.
    assert _adam_steps(final.optimizer) == ITERATIONS * STEPS_PER_ITERATION
    # Same weights, optimizer, RNG and data cursor: the third iteration samples what the
    # uninterrupted run sampled.
    resumed_third = [s["response"] for s in rows(out / "samples.jsonl") if s["iteration"] == 2]
    full_third = [s["response"] for s in rows(full_run / "samples.jsonl") if s["iteration"] == 2]
    assert resumed_third == full_third


def _adam_steps(optimizer_state: dict[str, Any]) -> int:
    steps = {float(state["step"]) for state in optimizer_state["state"].values()}
    assert len(steps) == 1, steps
    return int(steps.pop())


def _assert_same(left: Any, right: Any) -> None:
    """Equal nested state dicts, tensors compared exactly."""
    import torch

    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor)
        assert torch.equal(left.cpu(), right.cpu())
    elif isinstance(left, dict):
        assert isinstance(right, dict)
        assert left.keys() == right.keys()
        for key in left:
            _assert_same(left[key], right[key])
    elif isinstance(left, list | tuple):
        assert len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            _assert_same(a, b)
    else:
        assert left == right


@pytest.fixture
def orphan_prompts(tmp_path: Path) -> Path:
    # Two prompts, a batch of four: every batch holds each of them twice.
    return write_prompts(tmp_path / "orphan.jsonl", [PROMPTS[0], NO_BASELINE])


def test_samples_without_a_baseline_are_dropped_and_counted_under_skip(
    server: ServiceProcess, policy: Path, orphan_prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = train_args(
        policy,
        orphan_prompts,
        out,
        server.url,
        "--iterations=1",
        "--on-missing-baseline=skip",
        "--no-plots",
    )
    assert run_train(args) == 0
    samples = rows(out / "samples.jsonl")
    orphans = [s for s in samples if s["prompt_id"] == "orphan"]
    others = [s for s in samples if s["prompt_id"] == "sky"]
    assert len(orphans) == len(others) == 2
    for sample in orphans:
        assert (sample["used"], sample["skipped"], sample["baseline_source"]) == (
            None,
            True,
            "missing",
        )
    for sample in others:
        assert sample["skipped"] is False
        assert sample["used"] == pytest.approx(sample["contrastive"])
    (metrics,) = rows(out / "metrics.jsonl")
    assert (metrics["skipped"], metrics["kept"]) == (2, 2)
    assert math.isfinite(metrics["policy_loss"])


def test_a_missing_baseline_fails_the_run_by_default_keeping_the_iterations_done(
    server: ServiceProcess, policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One prompt per iteration, the orphan second in the seeded order: iteration 0 trains,
    # iteration 1 is refused by crs (409), and the run stops with a checkpoint after iteration 0.
    path = write_prompts(tmp_path / "prompts.jsonl", [PROMPTS[0], NO_BASELINE])
    lines = read_prompt_file(path)
    seed = next(s for s in range(20) if batch_prompts(lines, 1, 1, s)[0].prompt_id == "orphan")
    out = tmp_path / "run"
    one = ["--iterations=2", "--batch-size=1", "--minibatch-size=1", f"--seed={seed}", "--no-plots"]
    assert run_train(train_args(policy, path, out, server.url, *one)) == 1
    err = capsys.readouterr().err
    assert "prompts without a baseline: orphan" in err
    assert "--on-missing-baseline" in err
    assert "Traceback" not in err
    assert [row["iteration"] for row in rows(out / "metrics.jsonl")] == [0]
    assert load_checkpoint(checkpoint_dir(out)).state.iteration == 1
