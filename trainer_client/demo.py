"""`crs-trainer demo` (`make demo`): the method in small, end to end, in a few minutes.

On the gold-reward task of ``trainer_client.repro``: build (or reuse) the SFT policy and a
proxy reward model trained with 20% flipped labels, start a redis-server of our own (or the
service's in-process store when none is installed), serve the proxy RM with crs, sample and
push k = 3 SFT baseline responses per prompt, train a few PPO iterations with contrastive
rewards and as many with raw ones, and print the gold reward and win rate against SFT of each,
with the path of the plot. Everything started is stopped on the way out.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer_client.repro.grid import GridConfig, run_grid
from trainer_client.repro.report import headline, plot_curves, summarise

DEMO_NOISE = 0.2
DEMO_K = 3


def demo_config(
    workdir: Path,
    *,
    iterations: int = 30,
    quiet: bool = False,
    asset_options: Mapping[str, Any] | None = None,
    assets_dir: Path | None = None,
) -> GridConfig:
    """One noise level, one k, one seed: a raw and a contrastive run of the same budget."""
    return GridConfig(
        workdir=workdir,
        noise_levels=(DEMO_NOISE,),
        ks=(DEMO_K,),
        seeds=(0,),
        iterations=iterations,
        quiet=quiet,
        asset_options=asset_options or {},
        assets_dir=assets_dir,
    )


def run_demo(
    workdir: Path,
    *,
    iterations: int = 30,
    quiet: bool = False,
    asset_options: Mapping[str, Any] | None = None,
    assets_dir: Path | None = None,
) -> int:
    """Run the demo in ``workdir`` (its runs start afresh each time). The task's models are
    built in ``assets_dir`` (None: ``workdir/assets``), or reused from there: `crs-trainer
    reproduce` builds its own in the same place by default. ``asset_options`` sizes them
    (tests build smaller ones)."""
    config = demo_config(
        workdir,
        iterations=iterations,
        quiet=quiet,
        asset_options=asset_options,
        assets_dir=assets_dir,
    )
    shutil.rmtree(workdir / "runs", ignore_errors=True)
    print(
        f"demo: gold-reward task, proxy RM with {DEMO_NOISE:.0%} flipped labels, k = {DEMO_K} "
        f"baselines per prompt, {iterations} PPO iterations per arm (work directory {workdir})"
    )
    results = run_grid(config)
    cells = summarise(results)
    plot = workdir / "demo-curves.png"
    plot_curves(results, plot)
    print()
    print("| arm | gold reward | win rate vs SFT | proxy reward | KL |")
    print("|---|---|---|---|---|")
    for cell in cells:
        v = cell.values
        print(
            f"| {cell.arm} | {v['gold'].mean:.3f} | {v['win_rate'].mean:.3f} | "
            f"{v['proxy'].mean:.3f} | {v['kl'].mean:.3f} |"
        )
    print()
    for line in headline(cells):
        print(line)
    print("(one seed: a sketch, not a result; `crs-trainer reproduce` runs the full grid)")
    print(f"plot: {plot}")
    return 0
