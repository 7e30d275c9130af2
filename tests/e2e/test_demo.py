"""`crs-trainer demo` (what `make demo` runs): serves a tiny model, pushes baselines and prints
raw, baseline and contrastive rewards."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_client.cli import main


def test_demo_prints_contrastive_rewards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.endswith(("cache", "missing"))]
    assert [row.split()[-1] for row in rows] == ["cache", "cache", "cache", "missing"]
    assert "baselines pushed for 2 prompts" in "\n".join(lines)
