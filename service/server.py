"""Running the app under uvicorn with a graceful drain on SIGTERM."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from service.api.deps import Services
from service.app import create_app
from service.settings import Settings

log = logging.getLogger("crs.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining (``/readyz`` 503) as soon as a signal
    lands; uvicorn then stops accepting and lets in-flight requests finish."""

    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self.services = services

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.services.draining = True
        super().handle_exit(sig, frame)


def run_server(settings: Settings, *, access_log: bool = False) -> int:
    """Serve until a signal; exit code 0, or 1 when the model failed to load."""
    failures: list[BaseException] = []
    servers: list[DrainingServer] = []

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        for server in servers:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        log_config=None,
    )
    servers.append(DrainingServer(config, app.state.services))
    log.info("serving %s on http://%s:%d", settings.model_path, settings.host, settings.port)
    # SecretStr fields dump as "**********": tokens never reach the log.
    log.info("settings: %s", settings.model_dump(mode="json"))
    servers[0].run()
    if failures:
        log.error("exiting: the model failed to load: %s", failures[0])
        return 1
    return 0
