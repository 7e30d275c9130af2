"""`crs-trainer`: trainer-side commands (baseline sampling, upload, the reference PPO trainer)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommands arrive with the issues that build them."""
    parser = argparse.ArgumentParser(prog="crs-trainer", description=__doc__)
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `crs-trainer`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0
