"""`crs-trainer`: trainer-side commands (baseline sampling, upload, the reference PPO trainer)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer_client.ppo.cli import add_train_parser, run_train
from trainer_client.repro.cli import add_reproduce_parser, run_reproduce

# Exit codes: 0 done, 1 the work failed (some prompts not stored), 2 the command was unusable
# as given (missing file, bad URL, bad input line); argparse itself also exits 2.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crs-trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="the method in small: PPO with contrastive and with raw rewards from crs",
        description="Build (or reuse) a gold-reward task's SFT policy and a noisy proxy RM, "
        "serve it with crs, push SFT baselines, train PPO a few iterations with contrastive and "
        "with raw rewards, and print the gold reward and win rate of each.",
    )
    demo.add_argument("--workdir", type=Path, default=Path(".crs/demo"))
    demo.add_argument(
        "--assets",
        type=Path,
        default=Path(".crs/repro/assets"),
        help="where the task's models are built or reused (default: those of "
        "`crs-trainer reproduce`, .crs/repro/assets)",
    )
    demo.add_argument("--iterations", type=int, default=30, help="PPO iterations per arm")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    add_train_parser(commands)
    add_reproduce_parser(commands)
    _add_sample_parser(commands)
    _add_push_parser(commands)
    _add_tiny_policy_parser(commands)
    return parser


def _add_sample_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sample = commands.add_parser(
        "sample-baselines",
        help="sample k responses per prompt from the SFT policy into a baseline JSONL file",
        description="Sample k responses per prompt from a local causal LM. Resumable: prompts "
        "already in --out are skipped.",
    )
    sample.add_argument("--policy", type=Path, required=True, help="local causal LM directory")
    sample.add_argument(
        "--prompts", type=Path, required=True, help='JSONL of {"prompt", "prompt_id"?}'
    )
    sample.add_argument("-k", type=int, default=8, help="responses per prompt (default 8)")
    sample.add_argument("--out", type=Path, required=True, help="baseline JSONL (appended)")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--max-new-tokens", type=int, default=256)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument(
        "--batch-size", type=int, default=8, help="prompts per generate call (default 8)"
    )
    sample.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sample.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_push_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    push = commands.add_parser(
        "push-baselines",
        help="upload a baseline JSONL file to the service (PUT /v1/baselines)",
        description="Upload a baseline file in chunks through the reward client, retrying "
        "429/503/504 and connection failures on the next replica. Each line is sent with an "
        "upload id derived from it, so re-running after a failure stores every line once, "
        "under --mode append too.",
    )
    push.add_argument("file", type=Path, help="baseline JSONL written by sample-baselines")
    push.add_argument(
        "--url",
        action="append",
        required=True,
        help="service base URL, e.g. http://rm-0:8000; several replicas: repeat --url or "
        "give a comma-separated list",
    )
    push.add_argument(
        "--token",
        default=os.environ.get("CRS_API_TOKEN"),
        help="bearer token (default: $CRS_API_TOKEN)",
    )
    push.add_argument("--chunk-prompts", type=int, default=64, help="prompts per request")
    push.add_argument("--chunk-responses", type=int, default=1024, help="responses per request")
    push.add_argument("--mode", choices=("replace", "append"), default="replace")
    push.add_argument("--retries", type=int, default=8, help="retries per request (default 8)")
    push.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    push.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_tiny_policy_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    tiny = commands.add_parser(
        "tiny-policy",
        help="write a tiny random causal LM with a chat template (a stand-in SFT policy)",
        description="Write a small random-weight LlamaForCausalLM and a real tokenizer with a "
        "chat template into DIR, saved like any Hugging Face model. Without --tokenizer, the "
        "tokenizer of `python -m service tiny-model` is used (needs the server extra).",
    )
    tiny.add_argument("dir", type=Path, help="target directory (created; must be empty)")
    tiny.add_argument("--tokenizer", type=Path, help="model directory to take the tokenizer from")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `crs-trainer`."""
    args = build_parser().parse_args(argv)
    # Warnings (retries, dropped responses) to stderr; the summary line goes to stdout.
    logging.basicConfig(level=logging.WARNING, format="crs-trainer: %(message)s")
    if args.command == "sample-baselines":
        return run_sample(args)
    if args.command == "push-baselines":
        return run_push(args)
    if args.command == "tiny-policy":
        return run_tiny_policy(args)
    if args.command == "train":
        return run_train(args)
    if args.command == "reproduce":
        return run_reproduce(args, argv if argv is not None else sys.argv[1:])
    if args.iterations < 1:
        return _usage(f"--iterations must be >= 1, got {args.iterations}")
    from trainer_client.demo import run_demo

    return run_demo(
        args.workdir, iterations=args.iterations, quiet=args.quiet, assets_dir=args.assets
    )


def run_sample(args: argparse.Namespace) -> int:
    """`crs-trainer sample-baselines`."""
    # Imported here so that `crs-trainer --help` does not pay for the sampling stack.
    from trainer_client.baselines.records import RecordError
    from trainer_client.baselines.sampling import PolicyError, SamplingConfig, sample_baselines

    for path, what in ((args.policy, "--policy"), (args.prompts, "--prompts")):
        if not path.exists():
            return _usage(f"{what} {path} does not exist")
    try:
        config = SamplingConfig(
            k=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
        )
    except ValueError as error:
        return _usage(str(error))
    try:
        summary = sample_baselines(args.policy, args.prompts, args.out, config, quiet=args.quiet)
    except (RecordError, PolicyError) as error:
        return _usage(str(error))
    print(summary.line())
    return EXIT_OK


def run_push(args: argparse.Namespace) -> int:
    """`crs-trainer push-baselines`."""
    import httpx

    from trainer_client.baselines.push import PushOptions, failure_report, push_baselines
    from trainer_client.baselines.records import RecordError
    from trainer_client.client.retry import RetryPolicy

    if not args.file.is_file():
        return _usage(f"{args.file} is not a file")
    if not args.timeout > 0:
        return _usage(f"--timeout must be > 0, got {args.timeout}")
    urls = [url.strip() for given in args.url for url in given.split(",") if url.strip()]
    try:
        options = PushOptions(
            urls=urls,
            token=args.token,
            chunk_prompts=args.chunk_prompts,
            chunk_responses=args.chunk_responses,
            mode=args.mode,
            retry=RetryPolicy(retries=args.retries),
            # Connecting is quick or broken; scoring a large chunk is what takes time.
            timeout=httpx.Timeout(args.timeout, connect=min(args.timeout, 10.0)),
        )
    except ValueError as error:
        return _usage(str(error))
    try:
        summary = push_baselines(args.file, options, quiet=args.quiet)
    except RecordError as error:
        return _usage(str(error))
    for line in failure_report(summary):
        print(line, file=sys.stderr)
    print(summary.line())
    return EXIT_OK if summary.failed == 0 else EXIT_FAILED


def run_tiny_policy(args: argparse.Namespace) -> int:
    """`crs-trainer tiny-policy`."""
    from trainer_client.tiny_policy import TinyPolicyError, build_tiny_policy

    if args.tokenizer is not None and not args.tokenizer.is_dir():
        return _usage(f"--tokenizer {args.tokenizer} is not a directory")
    try:
        out = build_tiny_policy(args.dir, tokenizer_dir=args.tokenizer, seed=args.seed)
    except TinyPolicyError as error:
        return _usage(str(error))
    print(f"tiny policy written to {out}")
    return EXIT_OK


def _usage(message: str) -> int:
    print(f"crs-trainer: error: {message}", file=sys.stderr)
    return EXIT_USAGE
