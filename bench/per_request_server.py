"""The comparison point: a reward server that scores each request on its own.

It mimics OpenRLHF's ``serve_rm.py``: an ``async`` FastAPI route that tokenizes the request's
items and runs the model on them right there, so the forward pass blocks the event loop and no
two requests ever share a batch. It takes crs's ``POST /v1/rewards`` body so the same load
generator drives both, and uses crs's own model loading, formatting and forward pass, so the
only difference measured is the serving. Run it as
``python bench/per_request_server.py --model DIR --port N [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.scoring.model import RewardModel, load_reward_model
from service.scoring.types import RewardInput
from service.settings import Settings

WARM_UP_ITEM = RewardInput(prompt="How are you?", response="Fine, thank you.")


def create_app(model_path: Path, settings: Settings) -> FastAPI:
    """An app that loads the model at start-up and then scores one request per forward."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocking on purpose, like serve_rm.py: nothing is served until the model is loaded.
        model = load_reward_model(model_path, settings)
        model.forward(model.formatter.encode([WARM_UP_ITEM], "left"))
        app.state.model = model
        yield
        app.state.model = None

    app = FastAPI(title="per-request reward server (serve_rm.py style)", lifespan=lifespan)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/rewards")
    async def rewards(request: Request) -> JSONResponse:
        data = await request.json()
        return JSONResponse({"results": score_request(app.state.model, data["items"])})

    return app


def score_request(model: RewardModel, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One forward over this request's items, in arrival order, on the event loop's thread."""
    if not items:
        return []
    inputs = [RewardInput(prompt=item["prompt"], response=item["response"]) for item in items]
    encoded = model.formatter.encode(inputs, "left")
    rewards = model.forward(encoded)
    return [
        {"reward": reward, "tokens": item.length, "truncated": item.truncated}
        for reward, item in zip(rewards, encoded, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="reward model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import uvicorn

    settings = Settings.model_validate({"device": args.device, "dtype": args.dtype})
    app = create_app(args.model, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
