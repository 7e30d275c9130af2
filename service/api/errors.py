"""The one error envelope: ``{"error": {"type", "message", "details"}}`` (DESIGN.md 4)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("crs.api")

ERROR_TYPES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "overloaded",
    503: "not_ready",
    504: "timeout",
    507: "store_full",
    500: "internal",
}


class ErrorBody(BaseModel):
    """What went wrong: a stable ``type`` to branch on, a message for people, and details."""

    type: str = Field(description="one of the documented error types, e.g. overloaded")
    message: str
    details: Any = Field(description="structured context (null, an object or a list)")


class ErrorEnvelope(BaseModel):
    """The body of every error response (DESIGN.md 4)."""

    error: ErrorBody


# nginx's code for "client closed the request": nobody reads the answer, the metrics do.
CLIENT_CLOSED = 499


class ServiceError(Exception):
    """An error the API answers with the envelope; raise it anywhere under a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        details: Any = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type or ERROR_TYPES.get(status, "error")
        self.message = message
        self.details = details
        self.headers = headers


def client_closed() -> ServiceError:
    """The client went away before its answer was ready."""
    return ServiceError(CLIENT_CLOSED, "client disconnected", error_type="client_closed")


def envelope(error_type: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body of every error response."""
    return {"error": {"type": error_type, "message": message, "details": details}}


def error_response(error: ServiceError) -> JSONResponse:
    """Render a ServiceError as its envelope."""
    body = envelope(error.error_type, error.message, error.details)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def validation_details(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without the echoed input (it can be megabytes) and JSON-safe."""
    return [
        {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", "")), "type": error["type"]}
        for error in errors
    ]


def from_validation_error(error: ValidationError | RequestValidationError) -> ServiceError:
    """A 422 naming each bad field."""
    details = validation_details(error.errors())
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"]) or "body"
    return ServiceError(422, f"invalid request: {where}: {first['msg']}", details=details)


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc)


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(from_validation_error(exc))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers) if exc.headers else None
    details = None
    if status == 405:
        # Starlette names only the first route that matched the path; the path may have more.
        allowed = allowed_methods(request)
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        details = {"method": request.method, "allowed": allowed}
    return error_response(ServiceError(status, str(exc.detail), details=details, headers=headers))


# What 405 answers may list; probing each one leans only on Starlette's BaseRoute.matches.
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at the request's path, sorted."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error(request, exc)


def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A generic 500 for a failure nothing translated; the traceback goes to the log, never
    into the body."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ServiceError(500, "internal error; see the service log"))


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure, expected or not, through the envelope."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
