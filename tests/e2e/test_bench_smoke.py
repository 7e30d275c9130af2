"""The benchmarks run end to end: every throughput mode scores the same tokens, passes
alternate, the GRPO workload's reuse modes score as the others do, the baselines benchmark
sees cache hits, and the HTTP-overhead benchmark serves both scoring paths.

It measures nothing here (benchmarks never assert a time); it keeps the script working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_throughput_benchmark_runs_all_modes(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    command = [
        sys.executable, str(BENCH / "throughput.py"), "--model", str(tiny_llama), "--items", "24",
        "--concurrency", "4", "--batch-items", "8", "--warmup", "4", "--passes", "2",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["valid"] is True
    runs = {run["label"]: run for run in report["runs"]}
    assert set(runs) == {
        "bare",
        "service/1-item c=4",
        "service/8-item c=4",
        "per-request/1-item c=4",
    }
    # Every mode formatted and scored exactly the same items.
    assert len({run["tokens"] for run in runs.values()}) == 1
    assert all(run["items"] == 24 and run["failures"] == 0 for run in runs.values())
    assert all(len(run["passes_items_per_s"]) == 2 for run in runs.values())
    assert len(runs["service/1-item c=4"]["pass_ratios_to_bare"]) == 2
    assert report["summary"] in done.stdout


def test_throughput_grpo_workload_compares_prefix_reuse(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "throughput-grpo.json"
    command = [
        sys.executable, str(BENCH / "throughput.py"), "--model", str(tiny_llama),
        "--workload", "grpo", "--prompts", "3", "--completions", "4",
        "--prompt-tokens", "64", "128", "--response-tokens", "16", "32",
        "--concurrency", "2", "--warmup", "4", "--passes", "2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["valid"] is True
    assert report["workload"]["kind"] == "grpo"
    assert report["workload"]["items"] == 12
    assert report["workload"]["prompt_to_response_ratio"] > 1
    runs = {run["label"]: run for run in report["runs"]}
    assert set(runs) == {
        "bare",
        "bare-reuse",
        "crs/4-item c=2",
        "crs/1-item c=2",
        "crs-reuse/4-item c=2",
        "crs-reuse/1-item c=2",
    }
    # Every mode scored the same tokens, and each ran with reuse as its name says.
    assert len({run["tokens"] for run in runs.values()}) == 1
    assert all(run["items"] == 12 and len(run["passes_items_per_s"]) == 2 for run in runs.values())
    assert {label: run["prefix_reuse"] for label, run in runs.items()} == {
        label: label.startswith(("bare-reuse", "crs-reuse")) for label in runs
    }
    ratios = {(item["ratio"], item["of"]) for item in report["reuse_ratios"]}
    assert ratios == {
        ("bare-reuse/bare", "bare-reuse"),
        ("crs-reuse/crs", "crs-reuse/4-item c=2"),
        ("crs-reuse/crs", "crs-reuse/1-item c=2"),
        ("crs-reuse/bare", "crs-reuse/4-item c=2"),
        ("crs-reuse/bare", "crs-reuse/1-item c=2"),
    }
    equality = report["score_equality"]
    assert equality["bare"]["items"] == equality["crs"]["items"] == 12
    # Reuse is the same function: float32 rounding apart, the same rewards.
    assert 0 <= equality["max_abs_diff"] < 1e-4
    assert equality["max_abs_diff"] == max(
        equality["bare"]["max_abs_diff"], equality["crs"]["max_abs_diff"]
    )
    assert report["summary"] in done.stdout


def test_baselines_benchmark_runs(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "baselines.json"
    command = [
        sys.executable, str(BENCH / "baselines.py"), "--model", str(tiny_llama),
        "--prompts", "16", "-k", "2", "--repeats", "3", "--push-prompts", "4",
        "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["store_lookup"]["prompts"] == 16
    assert report["push"]["responses"] == 8
    assert report["rewards_request"]["items"] == 16
    assert report["summary"] in done.stdout


def test_http_overhead_benchmark_compares_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "http-overhead.json"
    command = [
        sys.executable, str(BENCH / "http_overhead.py"), "--requests", "40", "--concurrency",
        "4", "--batch-items", "1", "3", "--passes", "2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = {(run["mode"], run["request_items"]): run for run in report["runs"]}
    assert set(runs) == {(mode, size) for mode in ("direct", "framework") for size in (1, 3)}
    assert all(run["failures"] == 0 for run in runs.values())
    assert all(len(run["passes_requests_per_s"]) == 2 for run in runs.values())
    assert [ratio["request_items"] for ratio in report["ratios"]] == [1, 3]
    assert report["summary"] in done.stdout
