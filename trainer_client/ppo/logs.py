"""The trainer's outputs that are not models: ``metrics.jsonl``, ``samples.jsonl`` and the plot.

Rows are appended and flushed one iteration at a time, so a crashed run's files hold every
iteration it finished. A resumed run first drops the rows of iterations after its checkpoint
(they ran, but their updates were lost with the crash) and then appends, so each iteration
appears once in the files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
PLOT = Path("plots") / "training.png"

# The curves of the plot, in this order; extras a hook adds are drawn after them.
CURVES: tuple[tuple[str, ...], ...] = (
    ("reward_used",),
    ("reward_raw", "baseline", "contrastive"),
    ("kl", "kl_k1"),
    ("kl_coef",),
    ("policy_loss",),
    ("value_loss",),
    ("entropy",),
    ("clip_fraction", "value_clip_fraction"),
    ("approx_kl",),
    ("response_length",),
    ("scale",),
    ("reward_fetch_s", "rollout_s", "update_s"),
)

# Columns that are not curves: counters, names, the x axis.
_NOT_CURVES = frozenset({"iteration", "model_version", "skipped"})


class JsonlLog:
    """An append-only JSONL file, flushed after every batch of rows (context manager)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` and make them durable before the next iteration starts."""
        self._file.write(
            "".join(json.dumps(_jsonable(row), ensure_ascii=False) + "\n" for row in rows)
        )
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    # JSON has no NaN or infinity: a non-finite float is written as null, not as invalid JSON.
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in row.items()
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file (none when it does not exist); a torn last line is ignored."""
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a crash mid-write: what follows is not ours to guess
    return rows


def keep_iterations_before(path: Path, iteration: int) -> None:
    """Rewrite ``path`` with only the rows of iterations before ``iteration`` (for a resume)."""
    if not path.exists():
        return
    kept = [row for row in read_jsonl(path) if int(row.get("iteration", -1)) < iteration]
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8"
    )
    partial.replace(path)


def plot_metrics(metrics_path: Path, out_png: Path) -> Path:
    """Draw every numeric column of ``metrics.jsonl`` against the iteration into a PNG.

    matplotlib is imported here with the Agg backend: no display is needed, and importing the
    trainer does not pay for it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    panels = _panels(rows)
    columns = 3
    lines = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 2.8 * lines), squeeze=False)
    iterations = [row.get("iteration") for row in rows]
    for axis, names in zip(axes.flat, panels, strict=False):
        for name in names:
            ys = [_number(row.get(name)) for row in rows]
            axis.plot(iterations, ys, marker="." if len(rows) < 30 else None, label=name)
        axis.set_title(", ".join(names), fontsize=9)
        axis.set_xlabel("iteration", fontsize=8)
        axis.tick_params(labelsize=7)
        if len(names) > 1:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=90)
    plt.close(figure)
    return out_png


def _panels(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """The known curves that have data, then one panel per other numeric column (a hook's)."""
    numeric = {
        key for row in rows for key, value in row.items() if _number(value) is not None
    } - _NOT_CURVES
    panels = [tuple(n for n in names if n in numeric) for names in CURVES]
    panels = [names for names in panels if names]
    known = {name for names in CURVES for name in names}
    extras = sorted(numeric - known)
    return panels + [(name,) for name in extras]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn here (matplotlib not installed), or None."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return (
            "plots need matplotlib (pip install 'contrastive-reward-service[train]'); "
            "or pass --no-plots"
        )
    return None
