"""The app factory. ``create_app`` builds everything; the lifespan loads and stops the models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import ASGIApp

from service import __version__
from service.api import baselines, compat, health, models, rewards
from service.api.deps import Services
from service.api.direct import DirectRoutes
from service.api.errors import install_error_handlers
from service.api.openapi import with_body_schemas
from service.api.schemas import BaselinesPut, GetRewardRequest, ModelLoad, RewardsRequest
from service.baselines.service import BaselineService, open_store
from service.metrics import Metrics, MetricsMiddleware
from service.scoring.engine import HFRewardEngine, RewardEngine
from service.scoring.registry import DRAIN_GRACE_S, ModelRegistry, ModelSpec
from service.settings import Settings

log = logging.getLogger("crs.app")

# Builds the engine of one model version (loaded by the registry, at start or by an admin).
EngineFactory = Callable[[ModelSpec, Settings, Metrics], RewardEngine]
FatalHandler = Callable[[BaseException], None]


def default_engine(spec: ModelSpec, settings: Settings, metrics: Metrics) -> RewardEngine:
    """The Hugging Face engine for ``spec``'s directory, reporting batches to ``metrics``."""
    if spec.path is None:
        raise ValueError("no model: set CRS_MODEL_PATH or pass --model")
    overrides: dict[str, object] = {"model_path": spec.path}
    if spec.name is not None:
        overrides["model_name"] = spec.name
    if spec.label_index is not None:
        overrides["label_index"] = spec.label_index
    return HFRewardEngine(spec.path, settings.model_copy(update=overrides), metrics)


class ServiceApp(FastAPI):
    """The app: FastAPI's, with the routes of ``direct_routes`` (``POST /v1/rewards``) served
    past the framework's per-request layers (``service.api.direct`` says why); its services
    live on ``state.services``."""

    direct_routes: Sequence[APIRoute] = ()

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if not self.direct_routes:
            return stack
        services: Services = self.state.services
        return DirectRoutes(stack, self.direct_routes, services.metrics)


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory = default_engine,
    on_fatal: FatalHandler | None = None,
    direct_routes: bool = True,
) -> ServiceApp:
    """A FastAPI app serving the configured reward models (and those an admin loads).

    The models load in the background once the app starts, so ``/livez`` answers at once and
    ``/readyz`` turns 200 when every one is warm. A failed load is logged, shown by ``/readyz``
    and passed to ``on_fatal`` (the CLI stops the server with it). ``direct_routes=False``
    serves the scoring route through FastAPI's stack too, as a reference to compare with.
    """
    metrics = Metrics()
    registry = ModelRegistry(
        lambda spec: engine_factory(spec, settings, metrics),
        drain_timeout_s=settings.request_timeout_s + DRAIN_GRACE_S,
        drain_idle_s=settings.drain_idle_s,
        keep_previous=settings.keep_previous,
        observer=metrics,
    )
    services = Services(
        settings=settings,
        registry=registry,
        metrics=metrics,
        baselines=BaselineService(open_store(settings, metrics), settings, metrics),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A lifespan may run again on the same app (test harnesses restart it): start undrained.
        services.draining = False
        loading = asyncio.create_task(start_engine(services, on_fatal))
        checking = asyncio.create_task(services.baselines.check())
        try:
            yield
        finally:
            services.draining = True
            for task in (loading, checking):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await services.registry.astop()
            await services.baselines.store.aclose()

    app = ServiceApp(
        title="crs: contrastive reward service", version=__version__, lifespan=lifespan
    )
    app.state.services = services
    if direct_routes:
        # The scoring router's own routes: it is included as it is, at the same paths.
        app.direct_routes = [r for r in rewards.router.routes if isinstance(r, APIRoute)]
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(rewards.router)
    app.include_router(baselines.router)
    app.include_router(compat.router)
    app.include_router(models.router)
    if settings.admin_token is not None:  # the admin plane exists only with its token
        app.include_router(models.admin)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    bodies: list[type[BaseModel]] = [RewardsRequest, BaselinesPut, GetRewardRequest, ModelLoad]
    app.openapi = with_body_schemas(app, bodies)  # type: ignore[method-assign]
    return app


async def start_engine(services: Services, on_fatal: FatalHandler | None) -> None:
    """Load the configured models; report why when one fails."""
    specs = [ModelSpec(path=path, name=name) for name, path in services.settings.model_specs()]
    try:
        await services.registry.start(specs)
        # On CUDA, /metrics shows the device memory too: what a hot swap must give back.
        devices = {e.engine.info.device for e in services.registry.entries() if e.engine.info}
        if any(device.startswith("cuda") for device in devices):
            services.metrics.export_cuda_memory()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("model load failed: %s", exc)
        if on_fatal is not None:
            on_fatal(exc)
