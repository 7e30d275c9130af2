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
    health = services.registry.device_health
    if health.died:
        return JSONResponse(envelope("not_ready", threads_died(health)), status_code=503)
    return {"status": "alive"}


@router.get("/readyz", response_model=None, responses=NOT_READY)
async def readyz(services: ServicesDep) -> dict[str, Any] | JSONResponse:
    """200 once every configured model is loaded, warmed and active; 503 before that, while
    draining, and when no device thread is alive to score. A hot swap keeps it 200."""
    registry = services.registry
    if services.draining or not registry.ready:
        reason = "draining" if services.draining else registry.not_ready_reason
        return JSONResponse(envelope("not_ready", reason), status_code=503)
    if (health := registry.device_health).all_dead:
        return JSONResponse(envelope("not_ready", threads_died(health)), status_code=503)
    active = {name: entry.version for name in registry.names if (entry := registry.active(name))}
    default = registry.default_name or ""
    return {
        "status": "ready",
        "model": {"name": default, "version": active.get(default)},
        "models": active,
    }


# Documented as what it is: Prometheus text, not JSON.
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get("/metrics", response_class=PlainTextResponse, responses=PROMETHEUS_TEXT)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    return Response(services.metrics.render(), media_type="text/plain; version=0.0.4")
