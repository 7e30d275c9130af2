"""What the HTTP path itself costs the server per scoring request, with an engine that does nothing.

Two ``run_server`` processes serve an instant engine (no model, no tokenizer, no batcher): one
with ``POST /v1/rewards`` served directly (``service.api.direct``, the default) and one with it
served through FastAPI's stack (``direct_routes=False``). The same closed-loop clients drive
both in alternating passes; the report gives requests/s and, more stable on a shared machine,
the server's CPU microseconds per request (every thread of the process, from ``/proc``).

On a small CPU that CPU comes out of what the device threads get, and on any machine the event
loop's share of it caps the request rate of one process.

    .venv/bin/python bench/http_overhead.py --requests 4000 --passes 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cpu_usage
from http_client import post_bytes, run_closed_loop

from trainer_client.launch import ServiceProcess

log = logging.getLogger("bench.http_overhead")

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"  # where ServiceProcess serves
MODES = ("direct", "framework")
# A PPO sample's size on the wire: about 2 KB of prompt and 2 KB of response text.
PROMPT = "Explain why the sky is blue, step by step. " * 48
RESPONSE = "Sunlight scatters off air molecules; blue scatters most. " * 36


@dataclass(frozen=True, kw_only=True)
class Pass:
    mode: str
    request_items: int
    requests: int
    seconds: float
    server_cpu_s: float | None
    client_cpu_s: float
    failures: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def server_us_per_request(self) -> float | None:
        if self.server_cpu_s is None:
            return None
        return self.server_cpu_s / self.requests * 1e6


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per timed pass")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument(
        "--batch-items", type=int, nargs="+", default=[1, 64], help="items per request"
    )
    parser.add_argument("--passes", type=int, default=5, help="alternating passes per mode")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="server start, s")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.passes, *args.batch_items) < 1:
        parser.error("--requests, --concurrency, --passes and --batch-items must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    machine = machine_info()
    out: Path = args.out or BENCH_DIR / "results" / f"http-overhead-{machine['name']}.json"
    passes: list[Pass] = []
    with contextlib.ExitStack() as stack:
        ports = {mode: stack.enter_context(instant_server(mode, args)) for mode in MODES}
        for size in args.batch_items:
            raw = request_bytes(size)
            for port, _ in ports.values():
                warm_up(port, raw(port), size, args)
            for number in range(args.passes):
                for mode, (port, pid) in ports.items():
                    run = timed_pass(mode, port, pid, raw(port), size, args)
                    log.info(
                        "pass %d %s x%d: %.0f requests/s, %s us server CPU per request",
                        number + 1,
                        mode,
                        size,
                        run.requests_per_s,
                        rounded(run.server_us_per_request),
                    )
                    passes.append(run)
    report = build_report(args, machine, passes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)
    print(report["summary"])
    return 0


def machine_info() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "name": f"cpu-{cpus}core",
        "cpu_count": cpus,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "busy_cpus_before": rounded(cpu_usage.busy_cpus()),
    }


class InstantServer(ServiceProcess):
    """``bench/instant_server.py`` in a session of its own, stopped with its group; with
    ``--framework`` for the framework mode."""

    def __init__(self, mode: str) -> None:
        super().__init__(Path("instant"), args=["--framework"] if mode == "framework" else [])

    def start(self) -> InstantServer:
        command = [sys.executable, str(BENCH_DIR / "instant_server.py"), "--port", str(self.port)]
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [*command, *self.args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self


@contextlib.contextmanager
def instant_server(mode: str, args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    """The instant server for ``mode``, ready; its port and process id."""
    with InstantServer(mode) as server:
        server.wait_ready(args.ready_timeout)
        assert server.process is not None
        yield server.port, server.process.pid


def request_bytes(size: int) -> Any:
    """The raw request of ``size`` items, for a port."""
    payload = {"items": [{"prompt": PROMPT, "response": RESPONSE}] * size, "contrastive": None}
    return lambda port: post_bytes(HOST, port, "/v1/rewards", payload)


def warm_up(port: int, raw: bytes, size: int, args: argparse.Namespace) -> None:
    count = min(args.requests, 500)
    result = asyncio.run(
        run_closed_loop(
            HOST, port, [raw] * count, [size] * count, concurrency=args.concurrency, timeout_s=60
        )
    )
    if result.failures:
        raise SystemExit(f"warm-up failures: {result.errors}")


def timed_pass(
    mode: str, port: int, pid: int, raw: bytes, size: int, args: argparse.Namespace
) -> Pass:
    count = args.requests
    before = cpu_usage.sample(pid)
    started = time.perf_counter()
    result = asyncio.run(
        run_closed_loop(
            HOST, port, [raw] * count, [size] * count, concurrency=args.concurrency, timeout_s=60
        )
    )
    seconds = time.perf_counter() - started
    used = cpu_usage.used(before, cpu_usage.sample(pid))
    return Pass(
        mode=mode,
        request_items=size,
        requests=count,
        seconds=seconds,
        server_cpu_s=used.server_s,
        client_cpu_s=used.client_s,
        failures=result.failures,
    )


def build_report(
    args: argparse.Namespace, machine: dict[str, Any], passes: list[Pass]
) -> dict[str, Any]:
    runs = []
    for size in args.batch_items:
        for mode in MODES:
            mine = [p for p in passes if p.mode == mode and p.request_items == size]
            runs.append(
                {
                    "mode": mode,
                    "request_items": size,
                    "requests_per_s": rounded(statistics.median(p.requests_per_s for p in mine)),
                    "server_us_per_request": rounded(
                        median_or_none([p.server_us_per_request for p in mine])
                    ),
                    "passes_requests_per_s": [rounded(p.requests_per_s) for p in mine],
                    "passes_server_us_per_request": [
                        rounded(p.server_us_per_request) for p in mine
                    ],
                    "client_cpu_s": rounded(sum(p.client_cpu_s for p in mine)),
                    "failures": sum(p.failures for p in mine),
                }
            )
    return {
        "benchmark": "http_overhead",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine,
        "config": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "batch_items": args.batch_items,
            "passes": args.passes,
            "engine": "instant (no model, tokenizer or batcher)",
        },
        "runs": runs,
        "ratios": ratios(runs),
        "summary": summary(runs),
    }


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Direct over framework, per request size."""
    out = []
    for direct in (run for run in runs if run["mode"] == "direct"):
        [framework] = [
            run
            for run in runs
            if run["mode"] == "framework" and run["request_items"] == direct["request_items"]
        ]
        cpu_d, cpu_f = direct["server_us_per_request"], framework["server_us_per_request"]
        out.append(
            {
                "request_items": direct["request_items"],
                "requests_per_s": rounded(direct["requests_per_s"] / framework["requests_per_s"]),
                "server_cpu": None if not (cpu_d and cpu_f) else rounded(cpu_d / cpu_f),
            }
        )
    return out


def summary(runs: list[dict[str, Any]]) -> str:
    parts = [
        f"{run['mode']} x{run['request_items']}: {run['requests_per_s']:.0f} req/s, "
        f"{run['server_us_per_request']} us server CPU/request"
        for run in runs
    ]
    return "; ".join(parts)


def median_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def rounded(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3 if abs(value) < 10 else 1)


if __name__ == "__main__":
    sys.exit(main())
