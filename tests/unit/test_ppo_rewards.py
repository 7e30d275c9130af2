"""The PPO trainer's reward rules (which of crs's numbers is optimised, how it is scaled, which
samples are dropped), its configuration checks and its command's refusals, with hand-computed
values."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from trainer_client import RewardResult
from trainer_client.baselines.records import read_prompt_file
from trainer_client.launch import free_port
from trainer_client.ppo.cli import add_train_parser, config_from_args, run_train
from trainer_client.ppo.config import TrainConfig
from trainer_client.ppo.rewards import (
    RewardScaler,
    contrastive_options,
    lambda_factor,
    select_rewards,
)
from trainer_client.ppo.trainer import batch_prompts, sent_prompt_id

URL = "http://127.0.0.1:8000"


def config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "policy": Path("policy"),
        "prompts": Path("prompts.jsonl"),
        "out": Path("out"),
        "urls": (URL,),
        "batch_size": 4,
        "minibatch_size": 2,
    }
    return TrainConfig(**{**values, **overrides})


def result(reward: float, baseline: float | None, *, source: str = "cache") -> RewardResult:
    """A result as crs answers it: contrastive = reward - baseline, null without a baseline."""
    contrastive = None if baseline is None else reward - baseline
    return RewardResult(
        reward=reward,
        baseline=baseline,
        contrastive=contrastive,
        baseline_n=0 if baseline is None else 4,
        baseline_source="missing" if baseline is None else source,
        tokens=10,
        truncated=False,
        model_version="rm@1",
    )


# --- what is asked of crs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_missing", "on_unavailable", "expected_missing", "expected_unavailable"),
    [
        ("error", "skip", "error", "null"),
        ("raw", "raw", "raw", "raw"),
        ("skip", "error", "null", "error"),
    ],
)
def test_contrastive_requests_name_crs_policies_for_missing_and_unavailable_baselines(
    on_missing: str, on_unavailable: str, expected_missing: str, expected_unavailable: str
) -> None:
    options = contrastive_options(
        config(on_missing_baseline=on_missing, on_store_unavailable=on_unavailable)
    )
    assert options == {
        "aggregate": "mean",
        "on_missing": expected_missing,
        "on_unavailable": expected_unavailable,
    }


def test_raw_runs_still_ask_for_baselines_but_never_fail_on_a_missing_one() -> None:
    options = contrastive_options(config(reward="raw", on_missing_baseline="error"))
    assert options == {"aggregate": "mean", "on_missing": "null", "on_unavailable": "null"}


# --- selection -----------------------------------------------------------------------------


def test_contrastive_selection_takes_crs_contrastive_and_keeps_nulls() -> None:
    results = [result(1.5, 0.5), result(-2.0, 1.0), result(3.0, None)]
    assert select_rewards(results, config()) == [1.0, -3.0, None]


def test_raw_selection_takes_the_reward_even_without_a_baseline() -> None:
    results = [result(1.5, 0.5), result(-2.0, 1.0), result(3.0, None)]
    assert select_rewards(results, config(reward="raw")) == [1.5, -2.0, 3.0]


# --- scaling and dropping ------------------------------------------------------------------


def test_no_scaling_keeps_values_and_drops_nulls() -> None:
    results = [result(1.5, 0.5), result(3.0, None), result(-2.0, 1.0)]
    scaled = RewardScaler("none", 10.0).scale(results, [1.0, None, -3.0])
    assert scaled.used == [1.0, None, -3.0]
    assert scaled.scale == 1.0
    assert scaled.kept == [0, 2]
    assert scaled.skipped == 1


def test_running_std_divides_by_the_std_of_every_used_reward_so_far() -> None:
    scaler = RewardScaler("running-std", 10.0)
    first = [result(1.0, 0.0), result(3.0, 0.0)]
    # [1, 3]: population std 1.
    assert scaler.scale(first, [1.0, 3.0]).used == pytest.approx([1.0, 3.0])
    # [1, 3, 5]: mean 3, population variance (4 + 0 + 4) / 3.
    second = scaler.scale([result(5.0, 0.0), result(9.0, None)], [5.0, None])
    expected_scale = 1.0 / math.sqrt(8.0 / 3.0)
    assert second.scale == pytest.approx(expected_scale)
    assert second.used == [pytest.approx(5.0 * expected_scale), None]
    assert scaler.used_moments.count == 3  # the dropped sample is not counted


def test_running_std_of_equal_rewards_leaves_them_unscaled() -> None:
    scaled = RewardScaler("running-std", 10.0).scale([result(2.0, 0.0)] * 2, [2.0, 2.0])
    assert scaled.scale == 1.0
    assert scaled.used == [2.0, 2.0]


def test_lambda_is_the_ratio_of_mean_absolute_raw_to_contrastive_rewards() -> None:
    scaler = RewardScaler("lambda", 10.0)
    # raw |2|, |-4| -> 3; contrastive |1|, |-1| -> 1; the dropped sample's raw 100 is not used.
    results = [result(2.0, 1.0), result(-4.0, -3.0), result(100.0, None)]
    scaled = scaler.scale(results, select_rewards(results, config()))
    assert scaled.scale == pytest.approx(3.0)
    assert scaled.used == [pytest.approx(3.0), pytest.approx(-3.0), None]
    # Then raw |6| and contrastive |1| join: (2 + 4 + 6) / 3 = 4 over (1 + 1 + 1) / 3 = 1.
    later = scaler.scale([result(6.0, 5.0)], [1.0])
    assert later.scale == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("raw", "contrastive", "lambda_max", "expected"),
    [
        (3.0, 1.0, 10.0, 3.0),
        (3.0, 1.0, 2.0, 2.0),  # clipped above
        (1.0, 2.0, 10.0, 1.0),  # clipped below: contrastive already larger
        (0.0, 0.0, 10.0, 1.0),  # no data
        (2.0, 0.0, 10.0, 10.0),  # every response equal to its baseline
    ],
)
def test_lambda_factor_bounds(
    raw: float, contrastive: float, lambda_max: float, expected: float
) -> None:
    assert lambda_factor(raw, contrastive, lambda_max) == pytest.approx(expected)


def test_a_batch_with_every_sample_dropped_scales_nothing() -> None:
    scaler = RewardScaler("lambda", 10.0)
    scaled = scaler.scale([result(1.0, None), result(2.0, None)], [None, None])
    assert scaled.kept == []
    assert scaled.skipped == 2
    assert scaled.scale == 1.0
    assert scaler.raw_moments.count == 0


def test_scaler_state_round_trips() -> None:
    scaler = RewardScaler("lambda", 10.0)
    scaler.scale([result(2.0, 1.0), result(-4.0, -3.0)], [1.0, -1.0])
    restored = RewardScaler("lambda", 10.0)
    restored.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    assert restored.scale([result(6.0, 5.0)], [1.0]).scale == pytest.approx(4.0)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"urls": ()}, "urls"),
        ({"urls": ("rm-0:8000",)}, "urls"),
        ({"reward": "gold"}, "reward"),
        ({"reward_scale": "std"}, "reward_scale"),
        ({"reward": "raw", "reward_scale": "lambda"}, "lambda"),
        ({"lambda_max": 0.5}, "lambda_max"),
        ({"on_missing_baseline": "null"}, "on_missing_baseline"),
        ({"on_store_unavailable": "ignore"}, "on_store_unavailable"),
        ({"iterations": 0}, "iterations"),
        ({"batch_size": 2, "minibatch_size": 4}, "minibatch_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"learning_rate": -1e-5}, "learning_rate"),
        ({"clip_range": float("nan")}, "clip_range"),
        ({"gamma": 1.1}, "gamma"),
        ({"lam": -0.1}, "lam"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"kl_target": 0.0}, "kl_target"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"device": "tpu"}, "device"),
        ({"save_every": -1}, "save_every"),
        ({"torch_threads": 0}, "torch_threads"),
        ({"model": ""}, "model"),
    ],
)
def test_config_refuses_bad_settings_naming_the_field(
    overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        config(**overrides)


def test_config_defaults_are_the_documented_ones() -> None:
    made = config(batch_size=16, minibatch_size=8)
    assert (made.reward, made.reward_scale, made.on_missing_baseline) == (
        "contrastive",
        "none",
        "error",
    )
    assert (made.kl_coef, made.kl_target, made.kl_estimator) == (0.05, None, "k1")
    assert made.to_json()["policy"] == "policy"


def test_config_never_writes_the_token() -> None:
    assert config(token="secret").to_json()["token"] == "***"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="crs-trainer")
    add_train_parser(root.add_subparsers(dest="command", required=True))
    return root


def test_flags_map_onto_the_config() -> None:
    args = parser().parse_args(
        [
            "train",
            "--policy=p",
            "--prompts=x.jsonl",
            "--out=o",
            "--url=http://a:1,http://b:2",
            "--url=http://c:3",
            "--reward=raw",
            "--reward-scale=running-std",
            "--kl-target=6",
            "--no-whiten-advantages",
            "--no-overlap",
            "--batch-size=8",
        ]
    )
    made = config_from_args(args)
    assert made.urls == ("http://a:1", "http://b:2", "http://c:3")
    assert (made.reward, made.reward_scale, made.kl_target) == ("raw", "running-std", 6.0)
    assert (made.whiten_advantages, made.overlap, made.plots) == (False, False, True)
    assert made.batch_size == 8


def test_a_bad_setting_exits_2_with_its_message(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(
        ["train", "--policy=p", "--prompts=x", "--out=o", f"--url={URL}", "--minibatch-size=99"]
    )
    assert run_train(args) == 2
    assert "minibatch_size (99) must be <= batch_size (16)" in capsys.readouterr().err


def test_an_unreachable_service_is_a_message_naming_its_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "policy").mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = parser().parse_args(
        [
            "train",
            f"--policy={tmp_path / 'policy'}",
            f"--prompts={tmp_path / 'prompts.jsonl'}",
            f"--out={tmp_path / 'out'}",
            f"--url={url}",
            "--quiet",
        ]
    )
    assert run_train(args) == 1
    err = capsys.readouterr().err
    assert url in err
    assert "unreachable" in err
    assert "Traceback" not in err


def test_a_missing_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n')
    args = parser().parse_args(
        [
            "train",
            f"--policy={tmp_path / 'nowhere'}",
            f"--prompts={tmp_path / 'prompts.jsonl'}",
            f"--out={tmp_path / 'out'}",
            f"--url={URL}",
        ]
    )
    assert run_train(args) == 2
    assert "nowhere is not a directory" in capsys.readouterr().err


# --- the prompt stream ---------------------------------------------------------------------


def test_prompt_stream_covers_every_prompt_once_per_epoch_and_continues_at_the_cursor(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{n}"}) + "\n" for n in range(5)))
    prompts = read_prompt_file(path)
    stream = batch_prompts(prompts, 0, 10, seed=3)
    assert sorted(p.prompt for p in stream[:5]) == [f"p{n}" for n in range(5)]
    assert sorted(p.prompt for p in stream[5:]) == [f"p{n}" for n in range(5)]
    assert batch_prompts(prompts, 0, 4, 3) + batch_prompts(prompts, 4, 6, 3) == stream
    assert batch_prompts(prompts, 0, 5, seed=4) != stream[:5]


def test_only_prompt_ids_the_file_gave_are_sent(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "prompt_id": "q-a"}\n{"prompt": "b"}\n')
    given, derived = read_prompt_file(path)
    assert sent_prompt_id(given) == "q-a"
    assert sent_prompt_id(derived) is None
