"""The app factory. ``create_app`` builds everything; the lifespan starts and stops the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from service import __version__
from service.api import baselines, compat, health, rewards
from service.api.deps import Services
from service.api.errors import install_error_handlers
from service.api.openapi import with_body_schemas
from service.api.schemas import BaselinesPut, GetRewardRequest, RewardsRequest
from service.baselines.service import BaselineService, open_store
from service.metrics import Metrics, MetricsMiddleware
from service.scoring.engine import HFRewardEngine, RewardEngine
from service.settings import Settings

log = logging.getLogger("crs.app")

EngineFactory = Callable[[Settings, Metrics], RewardEngine]
FatalHandler = Callable[[BaseException], None]


def default_engine(settings: Settings, metrics: Metrics) -> RewardEngine:
    """The Hugging Face engine for ``settings.model_path``, reporting batches to ``metrics``."""
    if settings.model_path is None:
        raise ValueError("no model: set CRS_MODEL_PATH or pass --model")
    return HFRewardEngine(settings.model_path, settings, metrics)


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory = default_engine,
    on_fatal: FatalHandler | None = None,
) -> FastAPI:
    """A FastAPI app serving one reward engine.

    The model loads in the background once the app starts, so ``/livez`` answers at once and
    ``/readyz`` turns 200 when the model is warm. A failed load is logged, shown by ``/readyz``
    and passed to ``on_fatal`` (the CLI stops the server with it).
    """
    metrics = Metrics()
    services = Services(
        settings=settings,
        engine=engine_factory(settings, metrics),
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
            await services.engine.astop()
            await services.baselines.store.aclose()

    app = FastAPI(title="crs: contrastive reward service", version=__version__, lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(rewards.router)
    app.include_router(baselines.router)
    app.include_router(compat.router)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    app.openapi = with_body_schemas(app, [RewardsRequest, BaselinesPut, GetRewardRequest])  # type: ignore[method-assign]
    return app


async def start_engine(services: Services, on_fatal: FatalHandler | None) -> None:
    """Load the model; publish it in the metrics, or report why it failed."""
    try:
        await services.engine.astart()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("model load failed: %s", exc)
        if on_fatal is not None:
            on_fatal(exc)
        return
    info = services.engine.info
    if info is not None:
        services.metrics.model_info.labels(info.name, info.version).set(1)
