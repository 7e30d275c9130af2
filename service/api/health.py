"""Health and metrics: public, cheap, never touching the model or Redis."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.api.deps import ServicesDep
from service.api.errors import envelope

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The process is alive and its event loop turns."""
    return {"status": "alive"}


@router.get("/readyz", response_model=None)
async def readyz(services: ServicesDep) -> dict[str, Any] | JSONResponse:
    """200 once a model is loaded and warmed; 503 before that and while draining."""
    engine = services.engine
    if services.draining or engine.state != "ready" or engine.info is None:
        reason = "draining" if services.draining else f"model is {engine.state}"
        if engine.load_error:
            reason += f": {engine.load_error}"
        return JSONResponse(envelope("not_ready", reason), status_code=503)
    return {"status": "ready", "model": {"name": engine.info.name, "version": engine.info.version}}


# Documented as what it is: Prometheus text, not JSON.
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get("/metrics", response_class=PlainTextResponse, responses=PROMETHEUS_TEXT)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")
