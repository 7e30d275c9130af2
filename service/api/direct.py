"""The scoring hot path: ``POST /v1/rewards`` straight to its handler, past the framework's layers.

PPO workers send one sample per request as each rollout finishes, so what the event loop spends
per request matters: on a small CPU it holds the GIL the device threads need for a forward pass.
Through FastAPI's stack (server-error, telemetry, metrics and exception middleware, the exit
stack, routing, response validation, a ``send`` wrapper per layer) a single-item request costs
the server about twice the CPU it costs here (``bench/http_overhead.py``). Here the same handler
runs with the same metrics and the same error envelope; only the layers in between are gone.

The route stays registered with FastAPI, for the OpenAPI schema and for everything this does not
take: other methods (405 with ``Allow``), other paths (a trailing slash), websockets.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import ServiceError, error_response, unexpected_error
from service.metrics import Metrics, MetricsMiddleware


class DirectRoutes:
    """ASGI middleware, outermost in the app: requests for ``routes`` (method and exact path)
    run their endpoint here, everything else goes on to ``app``.

    An endpoint qualifies when it takes the request alone and returns a pydantic model (it
    parses and checks its own body, as the scoring routes do); anything else is refused at
    construction rather than served differently from the framework."""

    def __init__(self, app: ASGIApp, routes: Iterable[APIRoute], metrics: Metrics) -> None:
        self.app = app
        self.routes: dict[tuple[str, str], APIRoute] = {}
        for route in routes:
            check_direct(route)
            for method in route.methods or ():
                self.routes[method, route.path] = route
        self._serve_measured = MetricsMiddleware(self._serve, metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self.routes.get((scope["method"], get_route_path(scope)))
            if route is not None:
                scope["route"] = route  # what the metrics label requests by, as routing does
                await self._serve_measured(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: APIRoute = scope["route"]
        request = Request(scope, receive)
        response: Response
        try:
            answer = await route.endpoint(request)
            # The bytes FastAPI's own serialisation gives (pydantic's JSON, by alias), without
            # validating again a model the endpoint has just built.
            body = answer.__pydantic_serializer__.to_json(answer, by_alias=True)
            response = Response(body, media_type="application/json")
        except ServiceError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected_error(request, exc)
        await response(scope, receive, send)


def check_direct(route: APIRoute) -> None:
    """Refuse a route whose endpoint FastAPI would have to feed (parameters, dependencies)."""
    parameters = list(inspect.signature(route.endpoint).parameters.values())
    takes_request_only = len(parameters) == 1 and parameters[0].annotation in (Request, "Request")
    answers_a_model = isinstance(route.response_model, type) and issubclass(
        route.response_model, BaseModel
    )
    coroutine = inspect.iscoroutinefunction(route.endpoint)
    if not (takes_request_only and answers_a_model and coroutine) or route.dependencies:
        raise ValueError(
            f"{route.path}: a direct route's endpoint must be a coroutine taking only the "
            "request and returning a pydantic model, with no dependencies"
        )
