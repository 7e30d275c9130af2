"""Health and metrics: public, cheap, never touching the model or Redis."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.api.deps import ServicesDep
from service.api.errors import ErrorEnvelope, envelope
from service.scoring.batcher import DeviceHealth

router = APIRouter(tags=["health"])

NOT_LIVE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorEnvelope, "description": "a device thread died: restart the process"}
}
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorEnvelope,
        "description": "loading, failed, draining, or no device thread is alive",
    }
}


def threads_died(health: DeviceHealth) -> str:
    """What /livez and /readyz say when device threads died."""
    return (
        f"{health.died} of {health.started} device threads died ({health.alive} alive); "
        "only a restart brings them back"
    )


@router.get("/livez", response_model=None, responses=NOT_LIVE)
async def livez(services: ServicesDep) -> dict[str, str] | JSONResponse:
    """The process is alive and its event loop turns; 503 once a device thread has died, which
    only a restart mends (the others, if any, still score)."""
    health = services.engine.device_health
    if health.died:
        return JSONResponse(envelope("not_ready", threads_died(health)), status_code=503)
    return {"status": "alive"}


@router.get("/readyz", response_model=None, responses=NOT_READY)
async def readyz(services: ServicesDep) -> dict[str, Any] | JSONResponse:
    """200 once a model is loaded and warmed; 503 before that, while draining, and when no
    device thread is alive to score."""
    engine = services.engine
    if services.draining or engine.state != "ready" or engine.info is None:
        reason = "draining" if services.draining else f"model is {engine.state}"
        if engine.load_error:
            reason += f": {engine.load_error}"
        return JSONResponse(envelope("not_ready", reason), status_code=503)
    if (health := engine.device_health).all_dead:
        return JSONResponse(envelope("not_ready", threads_died(health)), status_code=503)
    return {"status": "ready", "model": {"name": engine.info.name, "version": engine.info.version}}


# Documented as what it is: Prometheus text, not JSON.
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get("/metrics", response_class=PlainTextResponse, responses=PROMETHEUS_TEXT)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")
