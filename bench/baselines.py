"""What baselines cost: Redis lookups per rewards request, and uploads against plain scoring.

Two measurements, against a ``redis-server`` of its own on a free port:

- ``lookup``: the store's lookup of 256 prompts' rewards as the service does it (one pipelined
  round trip) against one awaited GET per key, and, on a real ``crs-service serve`` process, a
  256-item ``POST /v1/rewards`` with contrastive rewards (all cache hits) against the same
  request with ``"contrastive": null``;
- ``push``: responses scored and stored per second by ``PUT /v1/baselines`` against the same
  pairs scored by ``POST /v1/rewards`` (without baselines) on the same server.

Prints the path of a JSON report and one summary line; it never asserts anything about time.
Run ``python bench/baselines.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
from workload import make_items

from trainer_client.launch import RedisProcess, ServiceProcess

log = logging.getLogger("bench.baselines")
BENCH_DIR = Path(__file__).resolve().parent
VERSION = "bench-rm@000000000000"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/baselines.py", description=__doc__)
    parser.add_argument("--model", type=Path, help="reward model (default: build a tiny llama)")
    parser.add_argument("--prompts", type=int, default=256, help="prompts per request (256)")
    parser.add_argument("-k", type=int, default=8, help="baseline responses per prompt (8)")
    parser.add_argument("--repeats", type=int, default=50, help="timed lookups per method")
    parser.add_argument("--push-prompts", type=int, default=64, help="prompts uploaded (64)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/...)")
    args = parser.parse_args(argv)
    if min(args.prompts, args.k, args.repeats, args.push_prompts) <= 0:
        parser.error("counts must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="crs-bench-") as tmp:
        model = args.model or build_model(Path(tmp))
        with RedisProcess(Path(tmp) / "redis") as redis:
            store = asyncio.run(store_lookups(redis.url, args))
            with ServiceProcess(
                model, args=["--redis-url", redis.url, "--device", args.device]
            ) as server:
                server.wait_ready(900)
                service = service_costs(server, model, args)
    report = {
        "benchmark": "baselines",
        "machine": {"cpu_count": cpu_count(), "python": sys.version.split()[0]},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "store_lookup": store,
        **service,
    }
    report["summary"] = summary(report)
    out: Path = args.out or BENCH_DIR / "results" / f"baselines-cpu-{cpu_count()}core.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)
    print(report["summary"])
    return 0


def build_model(tmp: Path) -> Path:
    from service.scoring.tiny import build_tiny_model

    return build_tiny_model(tmp / "tiny-llama", "llama")


def cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- the store alone ----------------------------------------------------------------------------


async def store_lookups(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The service's pipelined lookup against one awaited round trip per key."""
    from service.baselines.redis_store import connect, responses_key, rewards_key
    from service.baselines.store import BaselineWrite
    from service.settings import Settings

    store = connect(Settings(redis_url=url), _NoMetrics())
    ids = [f"bench-{n}" for n in range(args.prompts)]
    writes = [
        BaselineWrite(
            prompt_id=pid,
            prompt=f"prompt {pid}",
            responses=[f"response {j} to {pid}" for j in range(args.k)],
            version=VERSION,
            rewards=[float(j) for j in range(args.k)],
        )
        for pid in ids
    ]
    await store.write(writes)
    client = store._client  # the same connection pool the store uses

    async def pipelined() -> None:
        found = await store.lookup(ids, VERSION)
        assert all(found[pid].rewards is not None for pid in ids)

    async def per_key() -> None:
        for pid in ids:
            await client.hget(responses_key(pid), "digest")
            await client.get(rewards_key(pid, VERSION))

    results = {
        "prompts": args.prompts,
        "pipelined_ms": await timed(pipelined, args.repeats),
        "per_key_ms": await timed(per_key, args.repeats),
    }
    await store.aclose()
    results["per_key_over_pipelined"] = round(
        results["per_key_ms"]["p50"] / results["pipelined_ms"]["p50"], 2
    )
    return results


class _NoMetrics:
    def store_op(self, op: str, seconds: float, failed: bool) -> None:
        return None


async def timed(operation: Callable[[], Awaitable[None]], repeats: int) -> dict[str, float]:
    await operation()  # warm: connections open, scripts loaded
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        await operation()
        seconds.append(time.perf_counter() - started)
    return milliseconds(seconds)


def milliseconds(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50": round(statistics.median(ordered) * 1000, 3),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 3),
        "mean": round(statistics.fmean(ordered) * 1000, 3),
    }


# --- through the service ------------------------------------------------------------------------


def service_costs(server: ServiceProcess, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = make_items(tokenizer, args.prompts + args.push_prompts * args.k, seed=1)
    queries, rest = pairs[: args.prompts], pairs[args.prompts :]
    with httpx.Client(base_url=server.url, timeout=600) as client:
        upload = [
            {"prompt": query["prompt"], "responses": [p["response"] for p in rest[: args.k]]}
            for query in queries
        ]
        put(client, upload)  # every query's prompt has a baseline: lookups are cache hits
        overhead = request_overhead(client, queries, max(5, args.repeats // 5))
        push = push_throughput(client, rest, args)
    return {"rewards_request": overhead, "push": push}


def put(client: httpx.Client, items: list[dict[str, Any]]) -> None:
    response = client.put("/v1/baselines", json={"items": items})
    response.raise_for_status()
    if response.json()["failed"]:
        raise RuntimeError(f"upload not stored: {response.text[:300]}")


def request_overhead(
    client: httpx.Client, queries: list[dict[str, str]], repeats: int
) -> dict[str, Any]:
    """A 256-item rewards request with cached baselines against the same without baselines,
    alternating, so a drifting machine weighs on both."""
    timings: dict[str, list[float]] = {"raw": [], "contrastive": []}
    bodies = {"raw": {"items": queries, "contrastive": None}, "contrastive": {"items": queries}}
    for body in bodies.values():
        client.post("/v1/rewards", json=body).raise_for_status()  # warm
    for _ in range(repeats):
        for name, body in bodies.items():
            started = time.perf_counter()
            response = client.post("/v1/rewards", json=body)
            timings[name].append(time.perf_counter() - started)
            response.raise_for_status()
            if name == "contrastive":
                sources = {r["baseline_source"] for r in response.json()["results"]}
                if sources != {"cache"}:
                    raise RuntimeError(f"expected cache hits only, got {sources}")
    raw, with_baselines = milliseconds(timings["raw"]), milliseconds(timings["contrastive"])
    return {
        "items": len(queries),
        "raw_ms": raw,
        "contrastive_ms": with_baselines,
        "overhead_ms_p50": round(with_baselines["p50"] - raw["p50"], 3),
        "overhead_ratio_p50": round(with_baselines["p50"] / raw["p50"], 3),
    }


def push_throughput(
    client: httpx.Client, pairs: list[dict[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    """Responses per second through ``PUT /v1/baselines`` against ``POST /v1/rewards`` of the
    same (prompt, response) pairs."""
    items = [
        {
            "prompt": f"push prompt {n}: " + pairs[n * args.k]["prompt"],
            "responses": [p["response"] for p in pairs[n * args.k : (n + 1) * args.k]],
        }
        for n in range(args.push_prompts)
    ]
    scored = [{"prompt": i["prompt"], "response": r} for i in items for r in i["responses"]]
    score_s, push_s = [], []
    for _ in range(3):  # alternating; replace mode makes each upload the same work
        started = time.perf_counter()
        client.post("/v1/rewards", json={"items": scored, "contrastive": None}).raise_for_status()
        score_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        put(client, items)
        push_s.append(time.perf_counter() - started)
    score, push = statistics.median(score_s), statistics.median(push_s)
    return {
        "prompts": args.push_prompts,
        "responses": len(scored),
        "rewards_per_s": round(len(scored) / score, 1),
        "push_per_s": round(len(scored) / push, 1),
        "push_over_rewards": round(score / push, 3),
    }


def summary(report: dict[str, Any]) -> str:
    store, request, push = report["store_lookup"], report["rewards_request"], report["push"]
    return (
        f"lookup of {store['prompts']} prompts: pipelined {store['pipelined_ms']['p50']:.2f} ms, "
        f"one GET per key {store['per_key_ms']['p50']:.2f} ms "
        f"({store['per_key_over_pipelined']}x); {request['items']}-item rewards request: "
        f"+{request['overhead_ms_p50']:.1f} ms with baselines "
        f"({request['overhead_ratio_p50']}x of {request['raw_ms']['p50']:.1f} ms); push: "
        f"{push['push_per_s']} responses/s = {push['push_over_rewards']}x plain scoring"
    )


if __name__ == "__main__":
    raise SystemExit(main())
