"""Running the app under uvicorn: a drain on SIGTERM that answers every request, and bounded
connections and descriptors.

On SIGTERM (or SIGINT) the service drains instead of stopping at once:

1. ``/readyz`` answers 503 ``draining`` while the listener keeps answering, so that balancers
   and orchestrators see it. Requests keep being served (balancers go on sending for a few
   seconds after readiness flips) and their answers carry ``Connection: close``.
2. The drain ends once no request is in flight (and ``CRS_DRAIN_MIN_S`` has passed), or at
   ``CRS_SHUTDOWN_TIMEOUT_S``: every request still running then is cancelled and answered 503
   ``not_ready`` with ``Retry-After``, which clients retry on another replica.
3. uvicorn closes the listener and the connections, the engine stops, the process exits 0.

A second signal ends the drain at once (step 2 with whatever is in flight); a third stops
without answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import Services
from service.api.errors import envelope
from service.app import EngineFactory, create_app, default_engine
from service.connections import ConnectionLimits, GuardedHttpToolsProtocol
from service.settings import Settings

log = logging.getLogger("crs.server")

SHUTTING_DOWN = "the service is shutting down; retry on another replica"
# How long cancelled requests get to unwind and send their 503, and how long uvicorn then
# waits for connections to close: every request is answered by then, this is a backstop.
CUT_OFF_GRACE_S = 5.0
# Descriptors the process needs beside its connections: model files, Redis pool, pipes, logs.
RESERVED_DESCRIPTORS = 64
# The soft descriptor limit asked for at start, when the hard limit allows it.
WANTED_DESCRIPTORS = 65536


@dataclass
class Flight:
    """One request inside the app, and whether its response has begun."""

    started: bool = False
    cut_off: bool = False


@dataclass
class ShutdownGuard:
    """ASGI middleware that knows every request in flight, so that a drain can wait for them
    and, at its deadline, answer the rest with a 503 envelope instead of uvicorn's plain 500."""

    app: ASGIApp
    services: Services
    closed: bool = False
    flights: dict[asyncio.Future[None], Flight] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return len(self.flights)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.closed:
            await send_shutting_down(send)
            return
        flight = Flight()
        # The handler runs as a task of its own so that a cut-off can cancel it and still
        # answer from here.
        handler = asyncio.ensure_future(self.app(scope, receive, self.tracked(send, flight)))
        self.flights[handler] = flight
        try:
            await asyncio.wait({handler})
        finally:
            self.flights.pop(handler, None)
            handler.cancel()  # a no-op once done; stops it when uvicorn cancels this request
        if not flight.cut_off:
            handler.result()
        elif not flight.started:
            await send_shutting_down(send)

    def tracked(self, send: Send, flight: Flight) -> Send:
        async def tracked_send(message: Message) -> None:
            if flight.cut_off:
                return  # the 503 is sent from __call__; a late answer must not follow it
            if message["type"] == "http.response.start":
                flight.started = True
                if self.services.draining:
                    # Tell keep-alive clients to reconnect, most likely to another replica.
                    message = {**message, "headers": [*message["headers"], CONNECTION_CLOSE]}
            await send(message)

        return tracked_send

    async def cut_off(self, grace_s: float) -> int:
        """Cancel every request in flight (each then answers 503); refuse new ones from now.
        Returns how many were cut off."""
        self.closed = True
        handlers = list(self.flights)
        for handler in handlers:
            self.flights[handler].cut_off = True
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=grace_s)
        # Let each request's own task send its 503 before uvicorn starts closing connections.
        deadline = time.monotonic() + grace_s
        while self.flights and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return len(handlers)


CONNECTION_CLOSE = (b"connection", b"close")


async def send_shutting_down(send: Send) -> None:
    """503 ``not_ready``: this replica stops; the request is safe to retry elsewhere."""
    body = json.dumps(envelope("not_ready", SHUTTING_DOWN)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        CONNECTION_CLOSE,
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain described in this module's docstring."""

    def __init__(
        self, config: uvicorn.Config, services: Services, guard: ShutdownGuard, settings: Settings
    ) -> None:
        super().__init__(config)
        self.services = services
        self.guard = guard
        self.settings = settings
        self.drain_started: float | None = None
        self.drain_announced = False
        self.signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set flags only (no logging, no loop calls); on_tick acts on them.
        # Not uvicorn's handler: it would stop at once and re-raise the signal at exit.
        self.signals += 1
        if self.drain_started is None:
            self.services.draining = True
            self.drain_started = time.monotonic()
        elif self.signals >= 3:
            self.force_exit = self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            await self.advance_drain(time.monotonic() - self.drain_started)
        return await super().on_tick(counter)

    async def advance_drain(self, elapsed_s: float) -> None:
        settings, guard = self.settings, self.guard
        if not self.drain_announced:
            self.drain_announced = True
            log.info(
                "draining: /readyz answers 503; %d requests in flight; at most %g s",
                guard.in_flight,
                settings.shutdown_timeout_s,
            )
        hurried = self.signals >= 2
        if not hurried and elapsed_s < settings.drain_min_s:
            return
        if not hurried and guard.in_flight and elapsed_s < settings.shutdown_timeout_s:
            return
        if guard.in_flight:
            log.warning(
                "drain over after %.1f s: answering %d requests still in flight with 503",
                elapsed_s,
                guard.in_flight,
            )
        await guard.cut_off(CUT_OFF_GRACE_S)
        log.info("drained: stopping")
        self.should_exit = True


@dataclass(frozen=True, kw_only=True)
class Descriptors:
    """The descriptor limits at start and the connection cap they leave room for."""

    soft: int
    hard: int
    max_connections: int


def raise_descriptor_limit(settings: Settings) -> Descriptors:
    """Raise the soft RLIMIT_NOFILE towards the hard limit, so that connections, not
    descriptors, run out first; and lower the connection cap if the limit stays too low."""
    reserve = RESERVED_DESCRIPTORS + settings.redis_max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(WANTED_DESCRIPTORS, settings.max_connections + reserve)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d: %s", soft, exc)
        else:
            log.info("descriptor limit raised from %d to %d (hard limit %d)", soft, target, hard)
            soft = target
    cap = max(1, min(settings.max_connections, soft - reserve))
    if cap < settings.max_connections:
        log.warning(
            "CRS_MAX_CONNECTIONS %d lowered to %d: the descriptor limit is %d (hard %d)",
            settings.max_connections,
            cap,
            soft,
            hard,
        )
    return Descriptors(soft=soft, hard=hard, max_connections=cap)


def warn_on_misfit(settings: Settings) -> None:
    """Settings that work but defeat each other are logged at start."""
    if settings.shutdown_timeout_s < settings.request_timeout_s:
        log.warning(
            "CRS_SHUTDOWN_TIMEOUT_S (%g s) is shorter than CRS_REQUEST_TIMEOUT_S (%g s): on "
            "SIGTERM a request may be cut off (503, retried elsewhere) before its own timeout",
            settings.shutdown_timeout_s,
            settings.request_timeout_s,
        )


def run_server(
    settings: Settings,
    *,
    access_log: bool = False,
    engine_factory: EngineFactory = default_engine,
    direct_routes: bool = True,
) -> int:
    """Serve until a signal; exit code 0, or 1 when the model failed to load. The engine
    factory and ``direct_routes`` are ``create_app``'s (benchmarks serve other engines)."""
    failures: list[BaseException] = []
    servers: list[DrainingServer] = []

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        for server in servers:
            server.should_exit = True

    app = create_app(
        settings, engine_factory=engine_factory, on_fatal=on_fatal, direct_routes=direct_routes
    )
    services: Services = app.state.services
    guard = ShutdownGuard(app, services)
    descriptors = raise_descriptor_limit(settings)
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_connections=descriptors.max_connections,
    )
    config = uvicorn.Config(
        guard,
        host=settings.host,
        port=settings.port,
        http=GuardedHttpToolsProtocol.bind(limits),
        log_level=settings.log_level,
        access_log=access_log,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=int(CUT_OFF_GRACE_S),
        # Used if the h11 parser is ever chosen; httptools is bounded by the protocol above.
        h11_max_incomplete_event_size=settings.max_header_bytes,
        log_config=None,
    )
    servers.append(DrainingServer(config, services, guard, settings))
    log.info("serving %s on http://%s:%d", settings.model_path, settings.host, settings.port)
    log.info("settings: %s", settings.for_log())
    warn_on_misfit(settings)
    servers[0].run()
    if failures:
        log.error("exiting: the model failed to load: %s", failures[0])
        return 1
    return 0
