"""`crs-trainer demo`: build a tiny reward model, serve it, push baseline responses for the demo
prompts, and score a few pairs over HTTP: raw, baseline and contrastive rewards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from trainer_client.launch import ServiceProcess

DEMO_ITEMS: list[dict[str, Any]] = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "What is the capital of France?", "response": "I think it might be Lyon."},
    {"prompt": "Write a haiku about rain.", "response": "Soft rain on the roof / ..."},
    {
        "prompt": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "2 + 2?"},
        ],
        "response": "4",
    },
]


# What an SFT policy might have answered: each prompt's baseline (DESIGN.md 1).
DEMO_BASELINES: list[dict[str, Any]] = [
    {
        "prompt": "What is the capital of France?",
        "responses": ["Paris.", "The capital is Paris.", "France's capital is Paris, I believe."],
    },
    {
        "prompt": "Write a haiku about rain.",
        "responses": ["Rain falls / on the roof / softly", "Grey sky, wet street, calm.", "Rain."],
    },
]


def build_model(model_dir: Path) -> None:
    """A tiny random reward model, built once and reused by later demo runs."""
    if (model_dir / "config.json").exists():
        return
    command = [sys.executable, "-m", "service", "tiny-model", str(model_dir), "--arch", "llama"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def short(value: Any, width: int) -> str:
    text = value if isinstance(value, str) else " / ".join(m["content"] for m in value)
    return text if len(text) <= width else text[: width - 1] + "…"


def run_demo(workdir: Path) -> int:
    """Serve a tiny model on a free port, score the demo pairs, print them, stop the server."""
    model_dir = workdir / "tiny-llama-rm"
    print(f"building a tiny llama reward model in {model_dir} ...")
    build_model(model_dir)
    with ServiceProcess(model_dir) as server:
        print(f"starting crs-service on {server.url} ...")
        server.wait_ready()
        pushed = httpx.put(f"{server.url}/v1/baselines", json={"items": DEMO_BASELINES}, timeout=60)
        pushed.raise_for_status()
        response = httpx.post(f"{server.url}/v1/rewards", json={"items": DEMO_ITEMS}, timeout=60)
        response.raise_for_status()
        body = response.json()
    print(f"\nmodel {body['model']['version']} (random weights: the numbers mean nothing yet)")
    print(f"baselines pushed for {pushed.json()['stored']} prompts (the in-process store)\n")
    print(f"{'prompt':<32} {'response':<28} {'reward':>8} {'baseline':>8} {'contrast':>8}  source")
    for item, result in zip(DEMO_ITEMS, body["results"], strict=True):
        prompt, answer = short(item["prompt"], 32), short(item["response"], 28)
        values = [number(result[key]) for key in ("reward", "baseline", "contrastive")]
        print(f"{prompt:<32} {answer:<28} {' '.join(values)}  {result['baseline_source']}")
    return 0


def number(value: float | None) -> str:
    return f"{value:>8.4f}" if value is not None else f"{'-':>8}"
