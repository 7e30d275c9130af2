"""The comparison's judging and reporting: win rate, over-optimisation, the table, the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer_client.repro.grid import GridConfig, RunResult, noise_name, smooth, win_rate
from trainer_client.repro.report import headline, markdown_table, summarise, write_report


def run(arm: str, seed: int, gold: float, *, noise: float = 0.2, **fields: object) -> RunResult:
    values: dict[str, object] = {
        "noise": noise,
        "arm": arm,
        "seed": seed,
        "gold": gold,
        "win_rate": 0.5,
        "proxy": 1.0,
        "kl": 0.1,
        "reward_std": 0.3,
        "gold_curve": [0.0, 0.1, 0.2],
        "proxy_curve": [0.0, 0.1, 0.2],
        "seconds": 1.0,
        "rm_agreement": 0.75,
    }
    return RunResult(**(values | fields))  # type: ignore[arg-type]


def test_win_rate_counts_ties_as_half() -> None:
    # wins: 2 > 1 (1), 1 == 1 (0.5), 0 < 3 (0), 5 > 4 (1): 2.5 of 4
    assert win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0]) == 0.625


def test_win_rate_refuses_unpaired_samples() -> None:
    with pytest.raises(ValueError, match="same length"):
        win_rate([1.0], [1.0, 2.0])


@given(st.lists(st.floats(-5, 5), min_size=1, max_size=30))
def test_win_rate_against_itself_is_a_half(values: list[float]) -> None:
    assert win_rate(values, values) == 0.5


def test_smooth_is_a_trailing_mean() -> None:
    assert smooth([3.0, 0.0, 3.0, 6.0]) == [3.0, 1.5, 2.0, 3.0]


def test_over_optimisation_needs_gold_down_while_proxy_up() -> None:
    # smoothed gold: 0, 1, 2, 2, 5/3 -> peak 2 at index 2, end 5/3: a drop of 1/3
    fooled = run("raw", 0, 0.0, gold_curve=[0, 2, 4, 0, 1], proxy_curve=[0, 1, 2, 3, 4])
    assert fooled.over_optimisation == pytest.approx(1 / 3)
    # the same gold curve while the proxy fell too: noise, not over-optimisation
    honest = run("raw", 0, 0.0, gold_curve=[0, 2, 4, 0, 1], proxy_curve=[4, 3, 2, 1, 0])
    assert honest.over_optimisation == 0.0
    rising = run("raw", 0, 0.0, gold_curve=[0, 1, 2, 3], proxy_curve=[0, 1, 2, 3])
    assert rising.over_optimisation == 0.0


def test_noise_names_are_the_served_model_names() -> None:
    assert [noise_name(n) for n in (0.0, 0.2, 0.4)] == ["noise0", "noise20", "noise40"]


def test_grid_config_refuses_empty_cells() -> None:
    with pytest.raises(ValueError, match="at least one"):
        GridConfig(workdir=Path("w"), ks=())
    with pytest.raises(ValueError, match="noise"):
        GridConfig(workdir=Path("w"), noise_levels=(0.6,))
    assert GridConfig(workdir=Path("w"), ks=(1, 8)).arms() == [
        "raw",
        "contrastive-k1",
        "contrastive-k8",
    ]


def test_cells_average_over_seeds_with_sample_spread() -> None:
    cells = summarise([run("raw", 0, 1.0), run("raw", 1, 3.0), run("contrastive-k3", 0, 5.0)])
    assert [(c.arm, c.seeds) for c in cells] == [("raw", 2), ("contrastive-k3", 1)]
    assert cells[0].values["gold"].mean == 2.0
    assert cells[0].values["gold"].sd == pytest.approx(2**0.5)  # stdev of (1, 3)
    assert cells[1].values["gold"].sd == 0.0
    table = markdown_table(cells)
    assert "| 20% (0.750) | raw | 2 | 2.000 ± 1.414 |" in table


def test_headline_says_which_way_it_came_out() -> None:
    better = [run("raw", s, g) for s, g in ((0, 1.0), (1, 1.2))]
    better += [run("contrastive-k3", s, g) for s, g in ((0, 2.0), (1, 2.2))]
    assert "above raw" in headline(summarise(better))[0]
    worse = [run("raw", s, g) for s, g in ((0, 2.0), (1, 2.2))]
    worse += [run("contrastive-k3", s, g) for s, g in ((0, 1.0), (1, 1.2))]
    assert "below raw" in headline(summarise(worse))[0]
    tied = [run("raw", s, g) for s, g in ((0, 1.0), (1, 2.0))]
    tied += [run("contrastive-k3", s, g) for s, g in ((0, 1.1), (1, 2.1))]
    assert "within noise of raw" in headline(summarise(tied))[0]
    single = [run("raw", 0, 1.0), run("contrastive-k3", 0, 1.5)]
    assert (
        "above raw (difference +0.500, one seed: no spread to judge)"
        in (headline(summarise(single))[0])
    )


def test_report_writes_table_json_and_plots(tmp_path: Path) -> None:
    results = [
        run(arm, seed, 1.0 + seed, noise=noise)
        for noise in (0.0, 0.4)
        for arm in ("raw", "contrastive-k1")
        for seed in (0, 1)
    ]
    config = GridConfig(workdir=tmp_path / "work", noise_levels=(0.0, 0.4), ks=(1,), seeds=(0, 1))
    report = write_report(results, config, tmp_path / "out", "crs-trainer reproduce --seeds 2")
    text = report.read_text()
    assert "`crs-trainer reproduce --seeds 2`" in text
    assert text.count("| contrastive-k1 |") == 2
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["runs"]) == 8
    assert "workdir" not in saved["config"]
    for plot in ("gold-curves.png", "win-rate.png"):
        assert (tmp_path / "out" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
