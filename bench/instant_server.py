"""``crs-service serve``'s server (``run_server``) with an engine that answers at once.

For ``bench/http_overhead.py``: with no model, tokenizer or batcher behind it, what the server
spends per request is the HTTP path's own cost. ``--framework`` serves ``POST /v1/rewards``
through FastAPI's stack instead of directly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from service.scoring.batcher import DeviceHealth
from service.scoring.engine import EngineState, RewardEngine
from service.scoring.registry import ModelSpec
from service.scoring.types import ModelInfo, RewardInput, Score
from service.server import run_server
from service.settings import Settings, Truncation


class InstantEngine:
    """A ``RewardEngine`` whose reward is a tenth of the response's length, at once."""

    def __init__(self) -> None:
        self._state: EngineState = "loading"

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def info(self) -> ModelInfo | None:
        return self.identity if self._state == "ready" else None

    @property
    def identity(self) -> ModelInfo:
        return ModelInfo(
            name="instant",
            version="instant@000000000000",
            path=Path("instant"),
            device="cpu",
            dtype="float32",
            input_format="pair",
            max_input_tokens=1_000_000,
            label_index=0,
        )

    @property
    def load_error(self) -> str | None:
        return None

    @property
    def device_health(self) -> DeviceHealth:
        return DeviceHealth(started=1, alive=1, died=0)

    async def aidentify(self) -> ModelInfo:
        return self.identity

    async def astart(self, *, full_warm_up: bool = False) -> None:
        self._state = "ready"

    async def astop(self) -> None:
        self._state = "stopped"

    async def score(self, items: Sequence[RewardInput], *, truncation: Truncation) -> list[Score]:
        return [
            Score(reward=len(item.response) / 10, tokens=len(item.response) // 4, truncated=False)
            for item in items
        ]


def instant_engine(spec: ModelSpec, settings: Settings, metrics: object) -> RewardEngine:
    return InstantEngine()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--framework", action="store_true", help="no direct scoring route")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(model_path=Path("instant"), port=args.port, log_level="warning")
    return run_server(settings, engine_factory=instant_engine, direct_routes=not args.framework)


if __name__ == "__main__":
    sys.exit(main())
