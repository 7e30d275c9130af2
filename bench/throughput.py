"""Throughput of crs against the model alone and against a per-request server.

Two workloads. ``--workload ppo`` (the default): every item has a prompt of its own, in three
modes on the same items in one invocation:

- ``bare``: the model in this process, length-sorted token-budget batches, no HTTP: the ceiling.
- ``service``: a real ``crs-service serve`` process driven over HTTP by C concurrent clients,
  with single-item requests and with ``--batch-items`` requests.
- ``per-request``: ``bench/per_request_server.py``, the same model served the way OpenRLHF's
  ``serve_rm.py`` serves it (one forward per request, on the event loop), with single-item
  requests: the comparison point.

``--workload grpo``: P prompts x n completions, prompts about 4x as long as responses, in four
modes that tell what prompt-prefix reuse (``CRS_PREFIX_REUSE``) buys:

- ``bare``: the model in this process, one forward per prompt's n items, reuse off;
- ``bare-reuse``: the same with reuse on (the prompt's tokens run once per group);
- ``crs``: ``crs-service serve`` with ``CRS_PREFIX_REUSE=off``, one request per prompt (n items,
  as GRPO trainers send them) and single-item requests;
- ``crs-reuse``: the same service with ``CRS_PREFIX_REUSE=auto``.

Reuse must not change a score: the report gives the largest difference between the rewards with
reuse on and off for the same items (in process and through the service).

It prints the path of a JSON report and one summary line; it never asserts anything about time.
Run ``python bench/throughput.py --help`` for the options, and see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cpu_usage
import httpx
from cpu_usage import CpuUse
from http_client import (
    MAX_ERRORS_KEPT,
    LoadResult,
    Response,
    post_bytes,
    post_once,
    run_closed_loop,
)
from workload import (
    GRPO_PROMPT_TOKENS,
    GRPO_RESPONSE_TOKENS,
    PROMPT_TOKENS,
    RESPONSE_TOKENS,
    length_stats,
    make_grpo_items,
    make_items,
)

from trainer_client.launch import ServiceProcess

log = logging.getLogger("bench.throughput")

MODES = ("bare", "service", "per-request")
GRPO_MODES = ("bare", "bare-reuse", "crs", "crs-reuse")
WORKLOAD_MODES = {"ppo": MODES, "grpo": GRPO_MODES}
REUSE_MODES = ("bare-reuse", "crs-reuse")
WORKLOAD_TOKENS = {
    "ppo": (PROMPT_TOKENS, RESPONSE_TOKENS),
    "grpo": (GRPO_PROMPT_TOKENS, GRPO_RESPONSE_TOKENS),
}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
    },
    "llama-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
    },
}
# Llama-2's vocabulary size; the tiny tokenizer's ids (< 1024) are a subset of it.
SHAPED_VOCAB = 32000
DEFAULT_ITEMS = {"cpu": 512, "cuda": 1024}
DEFAULT_PROMPTS = {"cpu": 16, "cuda": 64}
DEFAULT_COMPLETIONS = 8
# The service says at load whether reuse came on ("prefix reuse for VERSION: on ...").
REUSE_LOG_LINE = re.compile(r"prefix reuse for \S+: (on|off)")
BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
REWARDS_PATH = "/v1/rewards"


@dataclass(frozen=True, kw_only=True)
class Run:
    """One measured pass of one mode."""

    mode: str
    request_items: int | None
    concurrency: int | None
    items: int
    tokens: int
    seconds: float
    requests: int
    failures: int
    latencies_s: Sequence[float] = ()
    errors: Sequence[str] = ()
    cpu: CpuUse | None = None
    # items/s of every pass when the mode ran several (this run is the median one)
    passes: Sequence[float] = ()
    # Whether the model scored with prompt-prefix reuse on (None: the mode does not say)
    prefix_reuse: bool | None = None

    @property
    def label(self) -> str:
        if self.request_items is None:
            return self.mode
        return f"{self.mode}/{self.request_items}-item c={self.concurrency}"

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    @property
    def valid(self) -> bool:
        return self.failures == 0

    def to_json(self, bare: Run | None, per_request: Run | None) -> dict[str, Any]:
        return {
            "label": self.label,
            "mode": self.mode,
            "request_items": self.request_items,
            "concurrency": self.concurrency,
            "items": self.items,
            "tokens": self.tokens,
            "requests": self.requests,
            "seconds": round(self.seconds, 4),
            "items_per_s": round(self.items_per_s, 2),
            "passes_items_per_s": [round(rate, 2) for rate in self.passes],
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else 0.0,
            "p50_ms": percentile_ms(self.latencies_s, 50),
            "p99_ms": percentile_ms(self.latencies_s, 99),
            "ratio_to_bare": ratio(self, bare),
            "pass_ratios_to_bare": pass_ratios(self, bare),
            "prefix_reuse": self.prefix_reuse,
            "ratio_to_per_request": ratio(self, per_request),
            "client_cpu_s": rounded(self.cpu.client_s if self.cpu else None),
            "server_cpu_s": rounded(self.cpu.server_s if self.cpu else None),
            "other_cpu_s": rounded(self.cpu.other_s if self.cpu else None),
            "failures": self.failures,
            "errors": list(self.errors),
            "valid": self.valid,
        }


def median_pass(runs: Sequence[Run]) -> Run:
    """The pass with the median items/s (the lower middle one of an even count), keeping
    every pass's figure; a failure in any pass makes it invalid."""
    ordered = sorted(runs, key=lambda run: run.items_per_s)
    middle = ordered[(len(ordered) - 1) // 2]
    return dataclasses.replace(
        middle,
        passes=[run.items_per_s for run in runs],
        failures=sum(run.failures for run in runs),
        errors=[error for run in runs for error in run.errors][:MAX_ERRORS_KEPT],
    )


def ratio(run: Run, reference: Run | None) -> float | None:
    if reference is None or reference is run or reference.items_per_s == 0:
        return None
    return round(run.items_per_s / reference.items_per_s, 3)


def pass_ratios(run: Run, reference: Run | None) -> list[float]:
    """Each pass's items/s over the reference's pass of the same round (bare's, say: the two
    ran minutes apart at most, so a drifting machine weighs on both)."""
    if reference is None or run is reference or len(run.passes) != len(reference.passes):
        return []
    return [
        round(ours / theirs, 3) if theirs > 0 else 0.0
        for ours, theirs in zip(run.passes, reference.passes, strict=True)
    ]


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def percentile_ms(latencies_s: Sequence[float], q: float) -> float | None:
    """The q-th percentile in milliseconds, interpolated between the nearest ranks."""
    if not latencies_s:
        return None
    ordered = sorted(latencies_s)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return round(value * 1000, 2)


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/throughput.py",
        description="Items/s of crs-service against the bare model and a per-request server.",
    )
    parser.add_argument(
        "--model", type=Path, help="reward model directory (default: build one of --shape)"
    )
    parser.add_argument(
        "--shape",
        choices=["tiny", *SHAPES],
        default="tiny",
        help="random-weight model to build when --model is absent (default tiny llama)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--workload",
        choices=list(WORKLOAD_MODES),
        default="ppo",
        help="ppo: a prompt per item (default); grpo: P prompts x n completions",
    )
    parser.add_argument(
        "--items", type=int, help="ppo: items to score (default 512 cpu, 1024 cuda)"
    )
    parser.add_argument("--prompts", type=int, help="grpo: prompts (default 16 cpu, 64 cuda)")
    parser.add_argument(
        "--completions",
        type=int,
        help=f"grpo: completions per prompt (default {DEFAULT_COMPLETIONS})",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="prompt lengths, uniform (default 64 512 ppo, 256 512 grpo)",
    )
    parser.add_argument(
        "--response-tokens",
        type=int,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="response lengths, uniform (default 32 512 ppo, 32 160 grpo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload and weights seed")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[32], help="concurrent clients (list)"
    )
    parser.add_argument(
        "--batch-items", type=int, default=64, help="ppo: items per batched request"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="token budget, bare and service"
    )
    parser.add_argument(
        "--modes",
        help="comma list; ppo: bare, service, per-request; grpo: bare, bare-reuse, crs, "
        "crs-reuse (default: all of the workload's)",
    )
    parser.add_argument("--warmup", type=int, default=64, help="warm-up items per configuration")
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="timed passes per mode, alternating between modes; medians are compared",
    )
    parser.add_argument(
        "--device-workers",
        type=int,
        help="forward threads, bare and service alike (default: the service's own default)",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    parser.add_argument("--plot", action="store_true", help="also a PNG (needs matplotlib)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="server start, s")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="per request, s")
    args = parser.parse_args(argv)
    args.modes = parse_modes(parser, args.modes, WORKLOAD_MODES[args.workload])
    size_workload(parser, args)
    for name in ("items", "batch_items", "max_batch_tokens", "passes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.device_workers is not None and args.device_workers <= 0:
        parser.error("--device-workers must be positive")
    if min(args.concurrency) <= 0 or args.warmup < 0:
        parser.error("--concurrency must be positive and --warmup not negative")
    if args.model is not None and args.shape != "tiny":
        parser.error("--shape builds a model; it cannot be combined with --model")
    return args


def parse_modes(
    parser: argparse.ArgumentParser, text: str | None, known: Sequence[str]
) -> list[str]:
    if text is None:
        return list(known)
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    if unknown := sorted(set(modes) - set(known)):
        parser.error(f"unknown mode(s) {unknown}; choose from {', '.join(known)}")
    # Always in this order: bare first, so later modes have their ratio, and its model is
    # freed before any server loads its own.
    return [mode for mode in known if mode in modes]


def size_workload(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the workload's defaults; refuse the other workload's options and empty ranges."""
    if args.workload == "grpo":
        if args.items is not None:
            parser.error("--items is for --workload ppo; grpo scores --prompts x --completions")
        args.prompts = DEFAULT_PROMPTS[args.device] if args.prompts is None else args.prompts
        if args.completions is None:
            args.completions = DEFAULT_COMPLETIONS
        if args.prompts <= 0 or args.completions <= 0:
            parser.error("--prompts and --completions must be positive")
        args.items = args.prompts * args.completions
    else:
        if args.prompts is not None or args.completions is not None:
            parser.error("--prompts and --completions are for --workload grpo")
        args.items = DEFAULT_ITEMS[args.device] if args.items is None else args.items
    prompt_default, response_default = WORKLOAD_TOKENS[args.workload]
    args.prompt_tokens = tuple(args.prompt_tokens or prompt_default)
    args.response_tokens = tuple(args.response_tokens or response_default)
    for name in ("prompt_tokens", "response_tokens"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= LOW <= HIGH")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen modes, write the JSON report and print its path and a summary line."""
    args = parse_args(argv)
    # Stopped by a time limit (bench/gpu.sh), it still stops the servers it started.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if any(mode in REUSE_MODES for mode in args.modes):
        require_prefix_reuse()
    machine = machine_info(args.device)
    warn_if_busy(machine)
    out: Path = args.out or BENCH_DIR / "results" / f"{report_stem(args)}-{machine['name']}.json"
    scores: Scores = {}
    with tempfile.TemporaryDirectory(prefix="crs-bench-") as tmp:
        model_dir = args.model or build_model(Path(tmp), args.shape, args.device, args.seed)
        items, stats = load_workload(model_dir, args)
        runs = run_modes(args, model_dir, items, scores)
    report = build_report(args, machine, runs, stats, scores)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(runs, out.with_suffix(".png"))
    print(out)
    print(report["summary"])
    return 0


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM as an exit: the open modes' context managers stop their servers (the default
    action would leave them running in their own sessions)."""
    raise SystemExit(128 + signum)


def report_stem(args: argparse.Namespace) -> str:
    """The default report's name before the machine's: one file per workload."""
    return "throughput" if args.workload == "ppo" else f"throughput-{args.workload}"


def require_prefix_reuse() -> None:
    """The reuse modes need the service's prompt-prefix reuse (``CRS_PREFIX_REUSE``)."""
    from service.scoring.model import RewardModel
    from service.settings import Settings

    fields = getattr(RewardModel, "__dataclass_fields__", {})
    if "prefix_reuse" not in Settings.model_fields or "prefix_reuse" not in fields:
        raise SystemExit(
            "prefix reuse is not available in this checkout: the modes "
            f"{', '.join(REUSE_MODES)} need CRS_PREFIX_REUSE (leave them out with --modes)"
        )


# Rewards of every item, in workload order, per mode that scored them all once untimed (the
# score-equality check compares reuse on with reuse off).
Scores = dict[str, list[float]]


def run_modes(
    args: argparse.Namespace, model_dir: Path, items: list[dict[str, str]], scores: Scores
) -> list[Run]:
    """One pass: each mode in turn, the bare model freed before a server loads its own.

    Several passes: every mode is set up at once and their passes alternate, so a machine whose
    speed drifts over minutes slows every mode alike; each reported run is its median pass.
    This holds a copy of the model per mode in memory at the same time."""
    if args.passes == 1:
        runs: list[Run] = []
        for mode in args.modes:
            with open_mode(mode, model_dir, items, args, scores) as measure:
                runs += measure()
            free_memory()
        return runs
    with contextlib.ExitStack() as stack:
        measures = [
            stack.enter_context(open_mode(mode, model_dir, items, args, scores))
            for mode in args.modes
        ]
        passes = [[run for measure in measures for run in measure()] for _ in range(args.passes)]
    medians = [median_pass(same) for same in zip(*passes, strict=True)]
    for run in medians:
        log.info("%s: median %.1f items/s of %s", run.label, run.items_per_s, run.passes)
    return medians


def open_mode(
    mode: str,
    model_dir: Path,
    items: list[dict[str, str]],
    args: argparse.Namespace,
    scores: Scores,
) -> contextlib.AbstractContextManager[Measure]:
    if args.workload == "grpo":
        return open_grpo_mode(mode, model_dir, items, args, scores)
    if mode == "bare":
        return bare_mode(model_dir, items, args)
    if mode == "service":
        server = service_process(model_dir, args)
        return server_mode(mode, server, items, (1, args.batch_items), args)
    return server_mode(mode, per_request_process(model_dir, args), items, (1,), args)


def open_grpo_mode(
    mode: str,
    model_dir: Path,
    items: list[dict[str, str]],
    args: argparse.Namespace,
    scores: Scores,
) -> contextlib.AbstractContextManager[Measure]:
    """GRPO modes: in process or the service, with prompt-prefix reuse off or on."""
    reuse = "auto" if mode in REUSE_MODES else "off"
    if mode in ("bare", "bare-reuse"):
        return grpo_bare_mode(mode, model_dir, items, reuse, args, scores)
    server = service_process(model_dir, args, prefix_reuse=reuse)
    # One request per prompt (its n completions, as GRPO trainers send them), then one per item.
    sizes = tuple(dict.fromkeys((args.completions, 1)))
    return server_mode(mode, server, items, sizes, args, scores)


# --- machine and model ------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on; ``name`` goes into the default file name."""
    import torch
    import transformers

    cpus = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but CUDA is not available")
        device_name = torch.cuda.get_device_name()
        name = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    else:
        device_name = platform.processor() or platform.machine()
        name = f"cpu-{cpus}core"
    return {
        "name": name,
        "device": device,
        "device_name": device_name,
        "cpu_count": cpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def warn_if_busy(machine: dict[str, Any]) -> None:
    """Note how busy the machine was before the start; other work skews every number."""
    busy = cpu_usage.busy_cpus()
    machine["busy_cpus_before"] = None if busy is None else round(busy, 2)
    if busy is not None and busy > 0.25 * machine["cpu_count"]:
        log.warning(
            "%.2f of %d CPUs busy before the start: something else runs, numbers will be noisy",
            busy,
            machine["cpu_count"],
        )


def build_model(tmp: Path, shape: str, device: str, seed: int) -> Path:
    """A random-weight reward model saved like any checkpoint, so every mode loads it alike."""
    from service.scoring.tiny import build_tiny_model

    log.info("building a random-weight %s reward model", shape)
    tiny = build_tiny_model(tmp / "tiny-llama", "llama", seed=seed)
    if shape == "tiny":
        return tiny
    return build_shaped_model(tmp / shape, shape, tiny, device, seed)


def build_shaped_model(
    out_dir: Path,
    shape: str,
    tokenizer_dir: Path,
    device: str,
    seed: int,
    shapes: dict[str, dict[str, Any]] = SHAPES,
) -> Path:
    """A Llama of ``shapes[shape]`` with random bf16 weights and the tiny llama's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=SHAPED_VOCAB,
        **shapes[shape],
        max_position_embeddings=4096,
        id2label={0: "reward"},
        label2id={"reward": 0},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    # Made in bf16 on the target device: an 8B model in fp32 on the CPU would take minutes.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    free_memory()
    return out_dir


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_workload(
    model_dir: Path, args: argparse.Namespace
) -> tuple[list[dict[str, str]], dict[str, float]]:
    """The items of ``args.workload``, and their measured mean lengths."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = {"prompt_tokens": args.prompt_tokens, "response_tokens": args.response_tokens}
    if args.workload == "grpo":
        items = make_grpo_items(
            tokenizer, args.prompts, args.completions, seed=args.seed, **lengths
        )
    else:
        items = make_items(tokenizer, args.items, seed=args.seed, **lengths)
    stats = length_stats(tokenizer, items)
    log.info(
        "workload: %d items in %.1f s; mean prompt %.1f, response %.1f tokens (ratio %.2f)",
        len(items),
        time.perf_counter() - started,
        stats["prompt_tokens_mean"],
        stats["response_tokens_mean"],
        stats["prompt_to_response_ratio"],
    )
    return items, stats


# --- bare -------------------------------------------------------------------------------------

# One timed pass of a mode: a run per configuration it measures.
Measure = Callable[[], list[Run]]


@contextlib.contextmanager
def bare_mode(
    model_dir: Path, items: list[dict[str, str]], args: argparse.Namespace
) -> Iterator[Measure]:
    """The model in this process: tokenize everything, plan token-budget batches and forward
    them on as many device threads as the service uses, with the same share of cores each."""
    from service.scoring.model import load_reward_model
    from service.settings import Settings

    settings = Settings(
        device=args.device,
        max_batch_tokens=args.max_batch_tokens,
        device_workers=args.device_workers,
    )
    model = load_reward_model(model_dir, settings)
    workers, threads = model.workers.workers, model.workers.threads_each
    log.info("bare: %d device thread(s), %s intra-op threads each", workers, threads)
    budget = args.max_batch_tokens
    with ThreadPoolExecutor(workers, initializer=model.bind_worker_thread) as device:
        if args.warmup:
            score_in_process(model, items[: args.warmup], args.max_batch_tokens, device)
        yield lambda: [
            bare_pass("bare", len(items), lambda: score_in_process(model, items, budget, device))
        ]


@contextlib.contextmanager
def grpo_bare_mode(
    mode: str,
    model_dir: Path,
    items: list[dict[str, str]],
    reuse: str,
    args: argparse.Namespace,
    scores: Scores,
) -> Iterator[Measure]:
    """The model in this process, one forward per prompt's n completions (the batch a GRPO
    trainer scores), with ``CRS_PREFIX_REUSE`` set to ``reuse``; the device threads take the
    next prompt's batch when free, as in ``bare``. An untimed pass first keeps every reward for
    the equality check (and warms up)."""
    from service.scoring.model import load_reward_model
    from service.settings import Settings

    settings = Settings(
        device=args.device,
        max_batch_tokens=args.max_batch_tokens,
        device_workers=args.device_workers,
        prefix_reuse=reuse,
    )
    model = load_reward_model(model_dir, settings)
    reused: bool = model.prefix_reuse
    if reuse != "off" and not reused:
        log.warning("%s: the load-time probe turned prefix reuse off for this model", mode)
    log.info("%s: prefix reuse %s", mode, "on" if reused else "off")
    n = args.completions
    with ThreadPoolExecutor(model.workers.workers, initializer=model.bind_worker_thread) as device:

        def score() -> tuple[int, list[float]]:
            return score_groups(model, items, n, device)

        scores[mode] = score()[1]
        yield lambda: [bare_pass(mode, len(items), score, prefix_reuse=reused)]


def bare_pass(
    mode: str,
    count: int,
    score: Callable[[], tuple[int, list[float]]],
    *,
    prefix_reuse: bool | None = None,
) -> Run:
    """One timed in-process pass of ``score`` (which returns real tokens and rewards)."""
    before = cpu_usage.sample()
    started = time.perf_counter()
    tokens, rewards = score()
    seconds = time.perf_counter() - started
    non_finite = sum(not math.isfinite(reward) for reward in rewards)
    run = Run(
        mode=mode,
        request_items=None,
        concurrency=None,
        items=count - non_finite,
        tokens=tokens,
        seconds=seconds,
        requests=0,
        failures=non_finite,
        errors=[f"{non_finite} non-finite rewards"] if non_finite else [],
        cpu=cpu_usage.used(before, cpu_usage.sample()),
        prefix_reuse=prefix_reuse,
    )
    log.info("%s: %.1f items/s", run.label, run.items_per_s)
    return run


def score_in_process(
    model: Any, items: list[dict[str, str]], budget: int, device: Executor
) -> tuple[int, list[float]]:
    """Real tokens scored and the rewards; each device thread takes the next planned batch as
    soon as it is free, as the service's do."""
    from service.scoring.model import plan_batches

    encoded = encode(model, items)
    batches = [
        [encoded[i] for i in batch] for batch in plan_batches([e.length for e in encoded], budget)
    ]
    rewards = [reward for batch in device.map(model.forward, batches) for reward in batch]
    return sum(item.length for item in encoded), rewards


def score_groups(
    model: Any, items: list[dict[str, str]], group: int, device: Executor
) -> tuple[int, list[float]]:
    """Real tokens scored and the rewards (in item order), one forward per ``group``
    consecutive items (one prompt's completions)."""
    encoded = encode(model, items)
    batches = [encoded[i : i + group] for i in range(0, len(encoded), group)]
    rewards = [reward for batch in device.map(model.forward, batches) for reward in batch]
    return sum(item.length for item in encoded), rewards


def encode(model: Any, items: list[dict[str, str]]) -> list[Any]:
    """The items tokenized by the model's own formatter (tokenizing is part of the timing)."""
    from service.scoring.types import RewardInput

    inputs = [RewardInput(prompt=item["prompt"], response=item["response"]) for item in items]
    encoded: list[Any] = model.formatter.encode(inputs, "none")
    return encoded


# --- servers over HTTP ------------------------------------------------------------------------


class PerRequestProcess(ServiceProcess):
    """``bench/per_request_server.py`` in a session of its own, stopped with its group."""

    def start(self) -> PerRequestProcess:
        command = [sys.executable, str(BENCH_DIR / "per_request_server.py")]
        command += ["--model", str(self.model), "--port", str(self.port), *self.args]
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self


def service_process(
    model_dir: Path, args: argparse.Namespace, *, prefix_reuse: str | None = None
) -> ServiceProcess:
    """``crs-service serve``, measured with single-item and batched requests; with
    ``prefix_reuse``, under that ``CRS_PREFIX_REUSE`` and logging at info, which says at load
    whether reuse came on (nothing is logged per request at that level)."""
    flags = ["--max-batch-tokens", str(args.max_batch_tokens), "--device", args.device]
    if args.device_workers is not None:
        flags += ["--device-workers", str(args.device_workers)]
    if prefix_reuse is None:
        return ServiceProcess(model_dir, args=[*flags, "--log-level", "warning"])
    return ServiceProcess(
        model_dir,
        args=[*flags, "--log-level", "info"],
        env={"CRS_PREFIX_REUSE": prefix_reuse},
    )


def served_prefix_reuse(server: ServiceProcess) -> bool | None:
    """Whether the ready server said it scores with prefix reuse on (None: it did not say)."""
    text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    found = REUSE_LOG_LINE.findall(text)
    return None if not found else found[-1] == "on"


def per_request_process(model_dir: Path, args: argparse.Namespace) -> ServiceProcess:
    """The serve_rm.py-style server, measured with single-item requests."""
    return PerRequestProcess(model_dir, args=["--device", args.device])


@contextlib.contextmanager
def server_mode(
    mode: str,
    server: ServiceProcess,
    items: list[dict[str, str]],
    sizes: Sequence[int],
    args: argparse.Namespace,
    scores: Scores | None = None,
) -> Iterator[Measure]:
    """A ready server, warmed up for every (items per request, concurrency) it is measured at.
    With ``scores``, every item's reward is kept first (untimed, ``sizes[0]`` items a request,
    one request at a time), for the equality check."""
    shapes = [(size, concurrency) for concurrency in args.concurrency for size in sizes]
    with server:
        server.wait_ready(args.ready_timeout)
        reuse = served_prefix_reuse(server)
        if mode in REUSE_MODES and reuse is False:
            log.warning("%s: the service's load-time probe turned prefix reuse off", mode)
        self_check(server.port, items[0])
        if scores is not None:
            scores[mode] = http_rewards(server.port, items, sizes[0], args.request_timeout)
        for size, concurrency in shapes:
            warm_up(mode, server, items[: args.warmup], (size, concurrency), args)
        prepared = [(shape, http_requests(server.port, items, shape[0])) for shape in shapes]
        yield lambda: [
            dataclasses.replace(
                http_pass(mode, server, requests, expected, shape, args), prefix_reuse=reuse
            )
            for shape, (requests, expected) in prepared
        ]


def warm_up(
    mode: str,
    server: ServiceProcess,
    items: list[dict[str, str]],
    shape: tuple[int, int],
    args: argparse.Namespace,
) -> None:
    if not items:
        return
    requests, expected = http_requests(server.port, items, shape[0])
    result = send(server.port, requests, expected, shape[1], args)
    if result.failures:
        log.warning("%s warm-up failures: %s", mode, result.errors)


def http_pass(
    mode: str,
    server: ServiceProcess,
    requests: list[bytes],
    expected: list[int],
    shape: tuple[int, int],
    args: argparse.Namespace,
) -> Run:
    """One timed closed-loop pass: every request once, ``shape`` = (items per request,
    concurrency)."""
    request_items, concurrency = shape
    pid = server.process.pid if server.process else None
    before = cpu_usage.sample(pid)
    result = send(server.port, requests, expected, concurrency, args)
    cpu = cpu_usage.used(before, cpu_usage.sample(pid))
    run = Run(
        mode=mode,
        request_items=request_items,
        concurrency=concurrency,
        items=result.items,
        tokens=result.tokens,
        seconds=result.seconds,
        requests=result.requests,
        failures=result.failures,
        latencies_s=result.latencies_s,
        errors=result.errors,
        cpu=cpu,
    )
    log.info("%s: %.1f items/s, %d failures", run.label, run.items_per_s, run.failures)
    if run.failures:
        log.warning("server log tail:\n%s", server.log_tail(20))
    return run


def http_requests(
    port: int, items: list[dict[str, str]], request_items: int
) -> tuple[list[bytes], list[int]]:
    """The items as serialised requests of ``request_items`` each, and each one's item count."""
    chunks = [items[i : i + request_items] for i in range(0, len(items), request_items)]
    requests = [post_bytes(HOST, port, REWARDS_PATH, rewards_body(chunk)) for chunk in chunks]
    return requests, [len(chunk) for chunk in chunks]


def send(
    port: int,
    requests: list[bytes],
    expected: list[int],
    concurrency: int,
    args: argparse.Namespace,
) -> LoadResult:
    """Every request once, from ``concurrency`` closed-loop clients."""
    return asyncio.run(
        run_closed_loop(
            HOST,
            port,
            requests,
            expected,
            concurrency=concurrency,
            timeout_s=args.request_timeout,
        )
    )


def http_rewards(
    port: int, items: list[dict[str, str]], request_items: int, timeout_s: float
) -> list[float]:
    """Every item's reward from the server, in item order, one request at a time."""
    requests, expected = http_requests(port, items, request_items)

    async def fetch() -> list[float]:
        rewards: list[float] = []
        for raw, count in zip(requests, expected, strict=True):
            response = await post_once(HOST, port, raw, timeout_s)
            results = response.json().get("results") if response.status == 200 else None
            if results is None or len(results) != count:
                raise RuntimeError(
                    f"scoring for the equality check failed: {response.status} "
                    f"{response.body[:300]!r}"
                )
            rewards += [float(result["reward"]) for result in results]
        return rewards

    return asyncio.run(fetch())


def rewards_body(items: list[dict[str, str]]) -> dict[str, Any]:
    # Raw rewards only: baselines are another cost, measured elsewhere.
    return {"items": items, "contrastive": None}


def self_check(port: int, item: dict[str, str]) -> None:
    """The minimal client must read the same answer as httpx does, or nothing it times counts."""
    body = rewards_body([item])
    ours = asyncio.run(post_once(HOST, port, post_bytes(HOST, port, REWARDS_PATH, body)))
    theirs = httpx.post(f"http://{HOST}:{port}{REWARDS_PATH}", json=body, timeout=120.0)
    if not same_answer(ours, theirs):
        raise RuntimeError(
            f"http_client and httpx disagree: {ours.status} {ours.body[:300]!r} "
            f"vs {theirs.status_code} {theirs.content[:300]!r}"
        )


def same_answer(ours: Response, theirs: httpx.Response) -> bool:
    if ours.status != 200 or theirs.status_code != 200:
        return False
    a, b = ours.json()["results"], theirs.json()["results"]
    return len(a) == len(b) and all(
        x["tokens"] == y["tokens"]
        and math.isclose(x["reward"], y["reward"], rel_tol=1e-3, abs_tol=1e-3)
        for x, y in zip(a, b, strict=True)
    )


# --- report -----------------------------------------------------------------------------------


def build_report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    runs: list[Run],
    stats: dict[str, float],
    scores: Scores,
) -> dict[str, Any]:
    bare = next((run for run in runs if run.mode == "bare"), None)
    per_request = {run.concurrency: run for run in runs if run.mode == "per-request"}
    report: dict[str, Any] = {
        "benchmark": "throughput",
        "machine": machine,
        "args": {
            "model": args.model.name if args.model else None,
            "shape": None if args.model else args.shape,
            "device": args.device,
            "workload": args.workload,
            "items": args.items,
            "prompts": args.prompts,
            "completions": args.completions,
            "seed": args.seed,
            "concurrency": args.concurrency,
            "batch_items": args.batch_items,
            "max_batch_tokens": args.max_batch_tokens,
            "modes": args.modes,
            "warmup": args.warmup,
            "passes": args.passes,
            "device_workers": args.device_workers,
        },
        "workload": {
            "kind": args.workload,
            "items": args.items,
            "prompts": args.prompts if args.workload == "grpo" else args.items,
            "completions": args.completions if args.workload == "grpo" else 1,
            "prompt_tokens": list(args.prompt_tokens),
            "response_tokens": list(args.response_tokens),
            **stats,
        },
        "runs": [
            run.to_json(bare, per_request.get(run.concurrency) if run.mode == "service" else None)
            for run in runs
        ],
        "valid": all(run.valid for run in runs),
    }
    summary = summary_line(runs, bare)
    if args.workload == "grpo":
        report["reuse_ratios"] = reuse_ratios(runs)
        report["score_equality"] = score_equality(scores)
        summary = grpo_summary(summary, report["reuse_ratios"], report["score_equality"])
    report["summary"] = summary
    return report


def reuse_ratios(runs: list[Run]) -> list[dict[str, Any]]:
    """What reuse buys: bare-reuse over bare, and per request shape and concurrency crs-reuse
    over crs and over bare; ``ratio`` of the median runs, ``pass_ratios`` round by round."""
    by_mode: dict[str, dict[tuple[int | None, int | None], Run]] = {}
    for run in runs:
        by_mode.setdefault(run.mode, {})[(run.request_items, run.concurrency)] = run
    bare = by_mode.get("bare", {}).get((None, None))
    pairs: list[tuple[str, Run, Run | None]] = []
    if (bare_reuse := by_mode.get("bare-reuse", {}).get((None, None))) is not None:
        pairs.append(("bare-reuse/bare", bare_reuse, bare))
    for shape, run in by_mode.get("crs-reuse", {}).items():
        pairs.append(("crs-reuse/crs", run, by_mode.get("crs", {}).get(shape)))
        pairs.append(("crs-reuse/bare", run, bare))
    return [
        {
            "ratio": name,
            "of": run.label,
            "to": reference.label,
            "median": ratio(run, reference),
            "pass_ratios": pass_ratios(run, reference),
        }
        for name, run, reference in pairs
        if reference is not None
    ]


# Pairs of modes that scored the same items, compared reward by reward: reuse on against off,
# in process and through the service, and the service against the model in process.
EQUALITY_PAIRS = {
    "bare": ("bare", "bare-reuse"),
    "crs": ("crs", "crs-reuse"),
    "crs_vs_bare": ("bare", "crs"),
}


def score_equality(scores: Scores) -> dict[str, Any]:
    """The largest absolute reward difference per pair of modes that scored the same items,
    and over the reuse pairs (``max_abs_diff``); null where a mode did not run."""
    equality: dict[str, Any] = {}
    for name, (first, second) in EQUALITY_PAIRS.items():
        if first not in scores or second not in scores:
            equality[name] = None
            continue
        a, b = scores[first], scores[second]
        equality[name] = {
            "modes": [first, second],
            "items": len(a),
            "max_abs_diff": max(abs(x - y) for x, y in zip(a, b, strict=True)),
            "max_abs_reward": max(abs(x) for x in a),
        }
    reuse = [equality[name]["max_abs_diff"] for name in ("bare", "crs") if equality[name]]
    equality["max_abs_diff"] = max(reuse) if reuse else None
    return equality


def grpo_summary(summary: str, ratios: list[dict[str, Any]], equality: dict[str, Any]) -> str:
    """The run summary, the reuse ratios and the reuse score difference."""
    parts = [summary]
    for item in ratios:
        if item["ratio"] == "crs-reuse/bare" or item["median"] is None:
            continue  # each run's ratio to bare is in the run summary already
        # "crs-reuse/8-item c=32" -> "8-item c=32": the request shape the ratio is at
        shape = item["of"].partition("/")[2]
        parts.append(f"{item['ratio']} {shape}".rstrip() + f": {item['median']:.2f}x")
    if equality["max_abs_diff"] is not None:
        parts.append(f"reuse max |reward diff| {equality['max_abs_diff']:.3g}")
    return "; ".join(parts)


def summary_line(runs: list[Run], bare: Run | None) -> str:
    """``bare: 160.2 items/s; service/1-item c=32: 0.87x bare (140.1 items/s); ...``"""
    parts: list[str] = []
    for run in runs:
        if run is bare:
            text = f"bare: {run.items_per_s:.1f} items/s"
        elif bare is not None and bare.items_per_s > 0:
            text = f"{run.label}: {run.items_per_s / bare.items_per_s:.2f}x bare"
            text += f" ({run.items_per_s:.1f} items/s)"
        else:
            text = f"{run.label}: {run.items_per_s:.1f} items/s"
        if not run.valid:
            text += f" INVALID ({run.failures} failures)"
        parts.append(text)
    return "; ".join(parts)


def write_plot(runs: list[Run], path: Path) -> None:
    """A bar chart of items/s per run, when matplotlib is installed (skipped silently if not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(runs)), 4.0))
    axes.bar([run.label for run in runs], [run.items_per_s for run in runs])
    axes.set_ylabel("items/s")
    axes.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
