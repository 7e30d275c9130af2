"""The comparison's report: a Markdown table (mean and spread over seeds), JSON, and plots.

matplotlib is imported inside the plotting functions, with the Agg backend (no display).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer_client.repro.grid import RAW, GridConfig, RunResult, noise_name, smooth

METRICS = ("gold", "win_rate", "proxy", "kl", "reward_std", "over_optimisation", "rm_agreement")


@dataclass(frozen=True, kw_only=True)
class Spread:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""

    mean: float
    sd: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(mean=statistics.fmean(values), sd=sd)

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One (noise level, arm) cell summarised over its seeds."""

    noise: float
    arm: str
    seeds: int
    values: dict[str, Spread]


def summarise(results: Sequence[RunResult]) -> list[Cell]:
    """Cells in the order their first run appears."""
    keys = list(dict.fromkeys((r.noise, r.arm) for r in results))
    cells = []
    for noise, arm in keys:
        runs = [r for r in results if (r.noise, r.arm) == (noise, arm)]
        values = {name: Spread.of([metric(r, name) for r in runs]) for name in METRICS}
        cells.append(Cell(noise=noise, arm=arm, seeds=len(runs), values=values))
    return cells


def metric(run: RunResult, name: str) -> float:
    value: float = getattr(run, name)
    return value


def markdown_table(cells: Sequence[Cell]) -> str:
    """One row per cell: gold reward and win rate against SFT (judged by the gold reward), the
    proxy reward, KL to the SFT policy, the used reward's spread across a batch, and
    over-optimisation (the gold reward lost from its peak while the proxy rose)."""
    header = (
        "| label noise (RM agreement) | arm | seeds | gold reward | win rate vs SFT | "
        "proxy reward | KL | reward std in batch | over-optimisation |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for cell in cells:
        v = cell.values
        rows.append(
            f"| {cell.noise:.0%} ({v['rm_agreement'].mean:.3f}) | {cell.arm} | {cell.seeds} | "
            f"{v['gold'].text()} | "
            f"{v['win_rate'].text()} | {v['proxy'].text()} | {v['kl'].text()} | "
            f"{v['reward_std'].text()} | {v['over_optimisation'].text()} |"
        )
    return header + "\n".join(rows) + "\n"


def headline(cells: Sequence[Cell]) -> list[str]:
    """Per noise level, the best contrastive arm against raw, in one sentence each."""
    lines = []
    for noise in dict.fromkeys(c.noise for c in cells):
        at = [c for c in cells if c.noise == noise]
        raw = next((c for c in at if c.arm == RAW), None)
        contrastive = [c for c in at if c.arm != RAW]
        if raw is None or not contrastive:
            continue
        best = max(contrastive, key=lambda c: c.values["gold"].mean)
        delta = best.values["gold"].mean - raw.values["gold"].mean
        spread = max(best.values["gold"].sd, raw.values["gold"].sd)
        verdict = "above" if delta > spread else "below" if delta < -spread else "within noise of"
        judged = f"largest seed spread {spread:.3f}"
        if min(best.seeds, raw.seeds) < 2:
            verdict, judged = "above" if delta > 0 else "not above", "one seed: no spread to judge"
        lines.append(
            f"At {noise:.0%} flipped labels, {best.arm} reached gold reward "
            f"{best.values['gold'].text()} (win rate {best.values['win_rate'].text()}) against "
            f"raw's {raw.values['gold'].text()} (win rate {raw.values['win_rate'].text()}): "
            f"{verdict} raw (difference {delta:+.3f}, {judged})."
        )
    return lines


def write_report(results: Sequence[RunResult], config: GridConfig, out: Path, command: str) -> Path:
    """``results.json``, ``README.md`` (table, headline, command) and two plots in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cells = summarise(results)
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "config": grid_settings(config),
                "runs": [asdict(r) | {"over_optimisation": r.over_optimisation} for r in results],
                "cells": [
                    {"noise": c.noise, "arm": c.arm, "seeds": c.seeds}
                    | {k: asdict(s) for k, s in c.values.items()}
                    for c in cells
                ],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    plot_curves(results, out / "gold-curves.png")
    plot_cells(cells, out / "win-rate.png")
    report = out / "README.md"
    minutes = sum(r.seconds for r in results) / 60
    report.write_text(
        "# Contrastive vs raw rewards on the gold-reward task\n\n"
        f"Made by `{command}` ({len(results)} PPO runs, {minutes:.1f} minutes of training and "
        "evaluation).\n\n"
        + "\n".join(f"- {line}" for line in headline(cells))
        + "\n\n"
        + markdown_table(cells)
        + "\nMean ± standard deviation over seeds. Gold reward and win rate are measured on "
        "fresh samples for each of the task's 96 prompts (the training prompts are drawn from "
        "the same 96: the samples are held out, the prompts cannot be), the win rate against "
        "SFT samples of the same prompts drawn with the same seed (ties count a half). RM "
        "agreement: the proxy RM's agreement with gold on clean held-out pairs. KL is the "
        "trainer's k3 estimate against the SFT policy over the last 3 iterations. Plots: "
        "`gold-curves.png` (gold and proxy reward during training), `win-rate.png`.\n",
        encoding="utf-8",
    )
    return report


def grid_settings(config: GridConfig) -> dict[str, object]:
    """The grid's settings as JSON (the work directory left out: it is this machine's)."""
    settings = asdict(config)
    settings.pop("workdir")
    settings["train_options"] = dict(config.train_options)
    settings["asset_options"] = dict(config.asset_options)
    return settings


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: Sequence[RunResult], path: Path) -> None:
    """Gold (top) and proxy (bottom) reward per iteration, mean over seeds, one column per
    noise level, one line per arm."""
    plt = _pyplot()
    noises = list(dict.fromkeys(r.noise for r in results))
    arms = list(dict.fromkeys(r.arm for r in results))
    figure, axes = plt.subplots(2, len(noises), figsize=(4.5 * len(noises), 7), squeeze=False)
    for column, noise in enumerate(noises):
        for arm in arms:
            runs = [r for r in results if (r.noise, r.arm) == (noise, arm)]
            for row, curve in enumerate(("gold_curve", "proxy_curve")):
                mean = [
                    statistics.fmean(v)
                    for v in zip(*(getattr(r, curve) for r in runs), strict=True)
                ]
                axes[row][column].plot(
                    smooth(mean), label=arm, linestyle="--" if arm == RAW else "-"
                )
        axes[0][column].set_title(f"{noise_name(noise)}: {noise:.0%} flipped labels")
        axes[0][column].set_ylabel("gold reward (rollouts)")
        axes[1][column].set_ylabel("proxy reward (rollouts)")
        axes[1][column].set_xlabel("PPO iteration")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_cells(cells: Sequence[Cell], path: Path) -> None:
    """Win rate against SFT per cell, with the spread over seeds."""
    plt = _pyplot()
    noises = list(dict.fromkeys(c.noise for c in cells))
    arms = list(dict.fromkeys(c.arm for c in cells))
    figure, axis = plt.subplots(figsize=(min(12.0, 2.5 * len(noises) + 2), 4))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        at = [next((c for c in cells if (c.noise, c.arm) == (n, arm)), None) for n in noises]
        xs = [n + (i - (len(arms) - 1) / 2) * width for n in range(len(noises))]
        means = [c.values["win_rate"].mean if c else 0.0 for c in at]
        sds = [c.values["win_rate"].sd if c else 0.0 for c in at]
        axis.bar(xs, means, width, yerr=sds, label=arm, capsize=3)
    axis.axhline(0.5, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(noises)), [f"{n:.0%} flipped" for n in noises])
    axis.set_ylabel("win rate vs SFT (gold judge)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
