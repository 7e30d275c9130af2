"""`crs-trainer reproduce`: the paper's comparison on the gold-reward task."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_reproduce_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reproduce = commands.add_parser(
        "reproduce",
        help="PPO with raw vs contrastive rewards on a gold-reward task (about 15 minutes)",
        description="Build the gold-reward task's SFT policy and proxy reward models (cached in "
        "--workdir), serve the proxy RMs with crs, push k SFT baseline responses per prompt, "
        "train PPO with raw and with contrastive rewards for every noise level, k and seed, "
        "and write a Markdown table and plots to --out. Finished runs are reused.",
    )
    reproduce.add_argument("--workdir", type=Path, default=Path(".crs/repro"))
    reproduce.add_argument("--out", type=Path, default=Path("bench/results/paper-repro"))
    reproduce.add_argument(
        "--noise", default="0,0.2,0.4", help="fractions of flipped RM labels (default 0,0.2,0.4)"
    )
    reproduce.add_argument("-k", default="1,3,8", help="baseline sizes (default 1,3,8)")
    reproduce.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    reproduce.add_argument("--iterations", type=int, default=None, help="PPO iterations per run")
    reproduce.add_argument("--batch-size", type=int, default=None, help="prompts per iteration")
    reproduce.add_argument(
        "--store",
        choices=("auto", "redis", "memory"),
        default="auto",
        help="baseline store: a redis-server of our own, the in-process one, or redis when found",
    )
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")


def run_reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the grid and write the report; 2 for unusable arguments."""
    from trainer_client.repro.grid import GridConfig, run_grid
    from trainer_client.repro.report import write_report

    try:
        overrides = {
            name: value
            for name, value in (("iterations", args.iterations), ("batch_size", args.batch_size))
            if value is not None
        }
        config = GridConfig(
            workdir=args.workdir,
            noise_levels=tuple(float(n) for n in args.noise.split(",")),
            ks=tuple(int(k) for k in args.k.split(",")),
            seeds=tuple(range(args.seeds)),
            use_redis={"auto": None, "redis": True, "memory": False}[args.store],
            quiet=args.quiet,
            **overrides,
        )
    except ValueError as error:
        print(f"crs-trainer: error: {error}", file=sys.stderr)
        return 2
    results = run_grid(config)
    command = shlex.join(["crs-trainer", *argv])
    report = write_report(results, config, args.out, command)
    print(report.read_text(encoding="utf-8"))
    print(f"report written to {report}")
    return 0
