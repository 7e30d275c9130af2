"""`crs-trainer demo` (what `make demo` runs): the gold-reward task in small, through a real
crs server, with contrastive and raw PPO runs judged by the gold reward.

The models are built smaller than the demo's defaults (the flow is what is tested here; the
full-size demo is run from a fresh clone for the issue's note)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.models import worker_share_of_torch_threads
from trainer_client.cli import main
from trainer_client.demo import run_demo

SMALL_ASSETS = {"train_prompts": 48, "sft_steps": 40, "rm_steps": 40, "rm_pairs": 256}


def table_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("raw", "contrastive-k3"):
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_trains_both_arms_and_prints_their_gold_reward_and_win_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "demo"
    with worker_share_of_torch_threads():
        code = run_demo(workdir, iterations=2, quiet=True, asset_options=SMALL_ASSETS)
    out = capsys.readouterr().out
    assert code == 0, out
    rows = table_rows(out)
    assert set(rows) == {"raw", "contrastive-k3"}, out
    for gold, win, proxy, kl in rows.values():
        assert 0.0 <= float(win) <= 1.0
        assert float(kl) >= 0.0
        float(gold), float(proxy)
    plot = workdir / "demo-curves.png"
    assert f"plot: {plot}" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # Both arms really trained through crs: their logs name the served proxy RM.
    for arm in rows:
        metrics = workdir / "runs" / "noise20" / arm / "seed0" / "metrics.jsonl"
        logged = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [row["iteration"] for row in logged] == [0, 1]
        assert all(row["model_version"].startswith("noise20@") for row in logged)
    contrastive = workdir / "runs" / "noise20" / "contrastive-k3" / "seed0" / "samples.jsonl"
    samples = [json.loads(line) for line in contrastive.read_text().splitlines()]
    assert samples, "the contrastive run logged no samples"
    assert all(s["baseline_source"] == "cache" for s in samples)
    assert all(s["used"] == pytest.approx(s["reward"] - s["baseline"], abs=1e-5) for s in samples)
    shutil.rmtree(workdir)


def test_demo_refuses_a_run_without_iterations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--iterations", "0"]) == 2
    assert "--iterations must be >= 1" in capsys.readouterr().err
