"""``crs-trainer train``: the flags of ``TrainConfig`` (dashes for underscores) and the command.

Exit codes as the other ``crs-trainer`` commands: 0 done, 1 the run failed (crs unreachable or
refusing), 2 unusable as given (a bad setting, a missing file, no checkpoint to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from trainer_client.ppo.config import (
    DEVICES,
    KL_ESTIMATORS,
    ON_MISSING_BASELINE,
    ON_STORE_UNAVAILABLE,
    REWARD_MODES,
    REWARD_SCALES,
    TrainConfig,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _default(name: str) -> Any:
    """A setting's default, from ``TrainConfig`` itself (one place for it)."""
    return next(field.default for field in fields(TrainConfig) if field.name == name)


def add_train_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train`` to ``crs-trainer``'s subcommands."""
    train = commands.add_parser(
        "train",
        help="train a policy with PPO on rewards from crs (the reference trainer)",
        description="PPO on a local causal LM with rewards from crs: contrastive (reward - the "
        "prompt's baseline) or raw, a per-token KL penalty against the initial policy, GAE, "
        "clipped policy and value losses. Writes metrics.jsonl, samples.jsonl, plots/, "
        "checkpoint/ and the final policy/ under --out. See docs/training.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_io(train)
    _add_reward(train)
    _add_ppo(train)
    _add_run(train)


def _add_io(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inputs and outputs")
    group.add_argument("--policy", type=Path, required=True, help="local causal LM directory")
    group.add_argument(
        "--prompts", type=Path, required=True, help='JSONL of {"prompt", "prompt_id"?}'
    )
    group.add_argument("--out", type=Path, required=True, help="output directory")
    group.add_argument(
        "--url",
        action="append",
        required=True,
        help="crs base URL; several replicas: repeat --url or give a comma-separated list",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("CRS_API_TOKEN"),
        help="bearer token (default: $CRS_API_TOKEN)",
    )
    group.add_argument("--model", help="crs model name, where it serves several")


def _add_reward(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reward")
    group.add_argument("--reward", choices=REWARD_MODES, default=_default("reward"))
    group.add_argument(
        "--reward-scale",
        choices=REWARD_SCALES,
        default=_default("reward_scale"),
        help="factor on the used reward: none, 1/running std, or the paper's lambda",
    )
    group.add_argument("--lambda-max", type=float, default=_default("lambda_max"))
    group.add_argument(
        "--on-missing-baseline",
        choices=ON_MISSING_BASELINE,
        default=_default("on_missing_baseline"),
    )
    group.add_argument(
        "--on-store-unavailable",
        choices=ON_STORE_UNAVAILABLE,
        default=_default("on_store_unavailable"),
    )


def _add_ppo(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("PPO")
    numbers: list[tuple[str, type[Any]]] = [
        ("iterations", int),
        ("batch_size", int),
        ("max_new_tokens", int),
        ("temperature", float),
        ("top_p", float),
        ("learning_rate", float),
        ("ppo_epochs", int),
        ("minibatch_size", int),
        ("clip_range", float),
        ("clip_range_value", float),
        ("vf_coef", float),
        ("ent_coef", float),
        ("max_grad_norm", float),
        ("gamma", float),
        ("lam", float),
        ("kl_coef", float),
    ]
    for name, kind in numbers:
        group.add_argument(_flag(name), type=kind, default=_default(name))
    group.add_argument(
        "--kl-target",
        type=float,
        default=None,
        help="adaptive KL coefficient aiming at this KL per sequence (default: fixed --kl-coef)",
    )
    group.add_argument("--kl-horizon", type=int, default=_default("kl_horizon"))
    group.add_argument(
        "--kl-estimator",
        choices=KL_ESTIMATORS,
        default=_default("kl_estimator"),
        help="per-token estimator of the KL penalty",
    )
    group.add_argument(
        "--whiten-advantages",
        action=argparse.BooleanOptionalAction,
        default=_default("whiten_advantages"),
    )


def _add_run(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=_default("seed"))
    group.add_argument("--device", choices=DEVICES, default=_default("device"))
    group.add_argument(
        "--save-every",
        type=int,
        default=_default("save_every"),
        help="checkpoint every N iterations (0: only at the end)",
    )
    group.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    group.add_argument("--plots", action=argparse.BooleanOptionalAction, default=_default("plots"))
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=_default("overlap"),
        help="compute reference logprobs and values while the rewards are fetched",
    )
    group.add_argument("--torch-threads", type=int, default=None)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the parsed flags describe.

    Raises:
        ValueError: a setting out of range or a bad combination (the message names it).
    """
    urls = tuple(url.strip() for given in args.url for url in given.split(",") if url.strip())
    values = {
        name: getattr(args, name)
        for name in TrainConfig.field_names()
        if name != "urls" and hasattr(args, name)
    }
    return TrainConfig(**values, urls=urls)


def run_train(args: argparse.Namespace) -> int:
    """``crs-trainer train``: 0 done, 1 crs failed the run, 2 unusable as given."""
    # Imported here: `crs-trainer --help` must not pay for torch and the client stack.
    from trainer_client.baselines.records import RecordError
    from trainer_client.baselines.sampling import PolicyError
    from trainer_client.client.reward_client import RewardServiceError
    from trainer_client.ppo.checkpoint import CheckpointError
    from trainer_client.ppo.trainer import TrainError, train

    try:
        config = config_from_args(args)
    except ValueError as error:
        return _fail(EXIT_USAGE, str(error))
    try:
        summary = train(config)
    except (TrainError, RecordError, PolicyError, CheckpointError) as error:
        return _fail(EXIT_USAGE, str(error))
    except RewardServiceError as error:
        return _fail(EXIT_FAILED, f"rewards from crs failed: {error}{_hint(error)}")
    print(summary.line())
    return EXIT_OK


def _hint(error: Any) -> str:
    """What to do about a refusal the trainer's flags can change (missing baselines)."""
    details = error.details if isinstance(error.details, dict) else {}
    missing = details.get("missing_prompt_ids")
    if not isinstance(missing, list):
        return ""
    shown = ", ".join(str(pid) for pid in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return (
        f"\n  prompts without a baseline: {shown}\n  push their baselines "
        "(crs-trainer sample-baselines, push-baselines) or pass --on-missing-baseline skip|raw"
    )


def _fail(code: int, message: str) -> int:
    print(f"crs-trainer: error: {message}", file=sys.stderr)
    return code
