"""`crs-trainer`: trainer-side commands (baseline sampling, upload, the reference PPO trainer)."""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crs-trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="serve a tiny reward model and score a few pairs")
    demo.add_argument("--workdir", type=Path, default=Path(".crs/demo"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `crs-trainer`."""
    args = build_parser().parse_args(argv)
    from trainer_client.demo import run_demo

    return run_demo(args.workdir)
