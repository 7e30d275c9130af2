"""The `client` extra alone: a fresh virtual environment with `pip install "<repo>[client]"`
imports trainer_client without torch or the service, and scores against a running server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_client.launch import ServiceProcess

REPO = Path(__file__).resolve().parents[2]
# What the distribution is built from (pyproject.toml names the readme).
SOURCES = ("pyproject.toml", "README.md", "service", "trainer_client")

SCRIPT = """
import importlib.util, json, sys
import trainer_client
from trainer_client import RewardClient

items = [
    {"prompt": "How are you?", "response": "Well, thanks."},
    {"prompt": [{"role": "user", "content": "Why is the sky blue?"}], "response": "Scattering."},
]
with RewardClient(sys.argv[1]) as client:
    results = client.score(items)
leaked = sorted({"torch", "transformers", "service"} & set(sys.modules))
print(json.dumps({
    "file": trainer_client.__file__,
    "leaked": leaked,
    "torch_installed": importlib.util.find_spec("torch") is not None,
    "results": [result.model_dump() for result in results],
}))
"""


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH: the new environment must find trainer_client in its own site-packages.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def copy_sources(target: Path) -> Path:
    """The files the build needs, copied: building in the checkout would leave build/ and
    *.egg-info behind in it."""
    target.mkdir()
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def index_reachable(python: Path, workdir: Path) -> bool:
    """Whether pip can fetch anything at all (else an install failure says nothing)."""
    probe = run(
        [str(python), "-m", "pip", "download", "--no-deps", "-d", str(workdir), "idna"], workdir
    )
    return probe.returncode == 0


def install_client(root: Path) -> Path:
    """A new virtual environment with the client extra installed; its python."""
    source = copy_sources(root / "src")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    installed = run([*pip, f"{source}[client]"], root)
    if installed.returncode != 0:
        if not index_reachable(python, root / "probe"):
            pytest.skip(f"pip cannot reach a package index:\n{installed.stderr[-2000:]}")
        pytest.fail(f"pip install of the client extra failed:\n{installed.stderr[-4000:]}")
    return python


def test_the_client_extra_alone_scores_without_torch(tiny_llama: Path, tmp_path: Path) -> None:
    with ServiceProcess(tiny_llama) as server:  # starts while pip works
        python = install_client(tmp_path)
        server.wait_ready()
        scored = run([str(python), "-c", SCRIPT, server.url], tmp_path)
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert Path(report["file"]).is_relative_to(tmp_path / "venv")
    assert report["leaked"] == []
    assert report["torch_installed"] is False  # the extra did not pull it in
    results = report["results"]
    assert len(results) == 2
    assert all(result["model_version"].startswith(f"{tiny_llama.name}@") for result in results)
    assert all(isinstance(result["reward"], float) for result in results)
    assert [result["baseline_source"] for result in results] == ["missing", "missing"]
