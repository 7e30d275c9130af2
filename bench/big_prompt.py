"""What one huge prompt costs a real crs-service process, and what it costs everyone else.

Per truncation mode (``none``, ``left``), on a fresh ``crs-service serve`` process (the tiny
random llama unless ``--model``): small requests from ``--clients`` threads alone, then the
same small requests while one prompt of ``--prompt-mb`` MB (under the default 32 MiB body
limit) is sent. It reports per mode:

- the big request's status and error type (under ``none`` it must be a 4xx envelope) and its
  median time over ``--repeat`` requests sent back to back;
- the server's memory: RSS and high-water mark (``VmHWM``) growth, from ``/proc``;
- small requests' p50/p90 latency while the big one was in flight, and the ratio of p50 to
  the unloaded p50 (measured in the same run).

It prints the path of a JSON report and one summary line; it never asserts anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from trainer_client.launch import ServiceProcess

SMALL = {"items": [{"prompt": "How are you?", "response": "Fine, thanks."}], "contrastive": None}
MiB = 1024 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


class SmallLoad:
    """``clients`` threads sending small requests back to back until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def __enter__(self) -> SmallLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                status = client.post("/v1/rewards", json=SMALL).status_code
                elapsed = time.perf_counter() - start
                with self._lock:
                    # Only requests answered before the stop count (those overlapped the load).
                    if not self._stop.is_set():
                        self.latencies.append(elapsed)
                    self.statuses.add(status)

    def wait_for(self, count: int) -> None:
        while len(self.latencies) < count:
            time.sleep(0.01)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def big_case(
    model: Path, body: bytes, clients: int, unloaded_count: int, repeat: int
) -> dict[str, Any]:
    """A fresh server: small requests alone, then ``repeat`` big requests one after another
    with the small ones beside them."""
    with ServiceProcess(model) as server:
        server.wait_ready()
        assert server.process is not None
        pid = server.process.pid
        with SmallLoad(server.url, clients) as warm:
            warm.wait_for(10)
        with SmallLoad(server.url, clients) as alone:
            alone.wait_for(unloaded_count)
        before = memory_kib(pid)
        with SmallLoad(server.url, clients) as beside:
            big_times, big_statuses = [], set()
            for _ in range(repeat):
                start = time.perf_counter()
                big = httpx.post(
                    f"{server.url}/v1/rewards",
                    content=body,
                    headers={"Content-Type": "application/json"},
                    timeout=600,
                )
                big_times.append(time.perf_counter() - start)
                big_statuses.add(big.status_code)
            beside.stop()
        after = memory_kib(pid)
    is_json = big.headers.get("content-type", "").startswith("application/json")
    payload = big.json() if is_json else {}
    unloaded_p50, loaded_p50 = quantile(alone.latencies, 0.5), quantile(beside.latencies, 0.5)
    return {
        "status": big.status_code,
        "statuses": sorted(big_statuses),
        "repeat": repeat,
        "error_type": (payload.get("error") or {}).get("type"),
        "truncated": [r["truncated"] for r in payload.get("results", [])] or None,
        "big_request_s": round(statistics.median(big_times), 3),
        "rss_growth_mib": round((after["VmRSS"] - before["VmRSS"]) / 1024, 1),
        "hwm_growth_mib": round((after["VmHWM"] - before["VmHWM"]) / 1024, 1),
        "small_unloaded_p50_ms": ms(unloaded_p50),
        "small_requests_beside": len(beside.latencies),
        "small_statuses": sorted(alone.statuses | beside.statuses),
        "small_loaded_p50_ms": ms(loaded_p50),
        "small_loaded_p90_ms": ms(quantile(beside.latencies, 0.9)),
        "small_loaded_max_ms": ms(max(beside.latencies, default=None)),
        "p50_ratio_loaded_unloaded": None
        if loaded_p50 is None or not unloaded_p50
        else round(loaded_p50 / unloaded_p50, 2),
    }


def big_body(prompt_mb: float, truncation: str) -> bytes:
    words = "lorem ipsum " * int(prompt_mb * MiB / 12)
    item = {"prompt": words, "response": "ok"}
    body = {"items": [item], "contrastive": None, "truncation": truncation}
    return json.dumps(body).encode()


def tiny_model(root: Path) -> Path:
    from service.scoring.tiny import build_tiny_model

    return build_tiny_model(root / "tiny-llama", "llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: tiny llama)")
    parser.add_argument("--prompt-mb", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2, help="small-request threads")
    parser.add_argument("--unloaded", type=int, default=100, help="small requests, unloaded")
    parser.add_argument("--repeat", type=int, default=5, help="big requests, back to back")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        cases = {
            truncation: big_case(
                model,
                big_body(args.prompt_mb, truncation),
                args.clients,
                args.unloaded,
                args.repeat,
            )
            for truncation in ("none", "left")
        }
    report = {
        "benchmark": "big_prompt",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": "tiny-llama" if args.model is None else str(args.model),
        "prompt_mb": args.prompt_mb,
        "clients": args.clients,
        "cases": cases,
    }
    out = args.out or Path(tempfile.mkstemp(prefix="big-prompt-", suffix=".json")[1])
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(out)
    none, left = cases["none"], cases["left"]
    print(
        f"{args.prompt_mb:g} MB prompt: none -> {none['status']} in {none['big_request_s']} s, "
        f"left -> {left['status']} in {left['big_request_s']} s; HWM growth "
        f"{none['hwm_growth_mib']}/{left['hwm_growth_mib']} MiB; small requests' p50 "
        f"x{none['p50_ratio_loaded_unloaded']}/x{left['p50_ratio_loaded_unloaded']} of unloaded "
        f"({none['small_unloaded_p50_ms']}/{left['small_unloaded_p50_ms']} ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
