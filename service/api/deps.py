"""What routes depend on: the app's services, readiness and bounded JSON bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from service.api.errors import ServiceError, client_closed, from_validation_error
from service.baselines.service import BaselineService
from service.metrics import Metrics
from service.scoring.registry import (
    ActivationFailed,
    AdminConflict,
    Lease,
    ModelNotReady,
    ModelRegistry,
    UnknownModel,
    UnknownVersion,
    VersionNotLoaded,
)
from service.scoring.types import ModelLoadError
from service.settings import Settings

BodyT = TypeVar("BodyT", bound=BaseModel)
OFF_LOOP_BYTES = 256 * 1024


@dataclass(kw_only=True)
class Services:
    """Everything one app instance owns, created in ``create_app`` and kept on ``app.state``."""

    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    baselines: BaselineService
    draining: bool = False


# Dependencies are coroutines on purpose: FastAPI runs plain functions in a thread pool,
# a thread hop per dependency per request.
async def get_services(request: Request) -> Services:
    return services_of(request)


ServicesDep = Annotated[Services, Depends(get_services)]


def services_of(request: Request) -> Services:
    """The app's services, for the scoring routes that take no dependencies: FastAPI's
    dependency solving is a tenth of the event loop's work per single-item request."""
    services: Services = request.app.state.services
    return services


def take_lease(services: Services, name: str | None = None, version: str | None = None) -> Lease:
    """A lease of the named model's active version (or of the pinned ``version``), to hold
    with ``with`` for the whole request; the envelope when there is none. Draining does not
    refuse: a request that got in is served, and only ``/readyz`` tells balancers to stop."""
    with registry_errors():
        return services.registry.lease(name, version)


@contextlib.contextmanager
def registry_errors() -> Iterator[None]:
    """The registry's refusals as envelope errors."""
    try:
        yield
    except UnknownModel as exc:
        raise ServiceError(404, str(exc), details={"model": exc.name, "models": exc.known}) from exc
    except UnknownVersion as exc:
        raise ServiceError(404, str(exc), details={"version": exc.version}) from exc
    except VersionNotLoaded as exc:
        details = {
            "reason": "version_not_loaded",
            "requested": exc.requested,
            "active": exc.active,
            "loaded": exc.loaded,
        }
        raise ServiceError(409, str(exc), details=details) from exc
    except ModelNotReady as exc:
        raise ServiceError(503, str(exc), headers={"Retry-After": "5"}) from exc
    except AdminConflict as exc:
        raise ServiceError(409, str(exc)) from exc
    except ActivationFailed as exc:
        raise ServiceError(
            503, str(exc), error_type="activation_failed", headers={"Retry-After": "5"}
        ) from exc
    except ModelLoadError as exc:
        raise ServiceError(422, str(exc), error_type="invalid_model") from exc


async def read_json(request: Request, max_bytes: int, timeout_s: float | None = None) -> Any:
    """The parsed JSON body; 413 as soon as it is known to exceed ``max_bytes``, 408 when it
    has not arrived in full within ``timeout_s`` (a stalled client must not hold a slot)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    try:
        async with asyncio.timeout(timeout_s):
            body = await read_body(request, max_bytes)
    except TimeoutError as exc:
        raise ServiceError(
            408,
            f"the request body did not arrive within {timeout_s:g} s",
            # The rest of the body may never come: the connection cannot be reused.
            headers={"Connection": "close"},
        ) from exc
    try:
        if len(body) < OFF_LOOP_BYTES:
            return json.loads(body)
        # Megabytes of JSON take milliseconds to parse: keep the event loop free meanwhile.
        return await asyncio.to_thread(json.loads, body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and integers of over 4300 digits;
        # RecursionError a deeply nested body.
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ServiceError(422, f"body is not valid JSON: {reason}") from exc


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it exceeds ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large(f"body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise client_closed() from exc
    return b"".join(chunks)


def too_large(message: str) -> ServiceError:
    return ServiceError(413, message)


def check_item_count(payload: Any, field: str, limit: int) -> None:
    """413 on too many items, before validating any of them."""
    items = payload.get(field) if isinstance(payload, dict) else None
    if isinstance(items, list) and len(items) > limit:
        raise ServiceError(
            413,
            f"{len(items)} items exceed the limit of {limit} per request; split the request",
            details={"items": len(items), "max_items_per_request": limit},
        )


def refuse_lone_surrogates(payload: Any) -> None:
    """422 naming the first string (value or key) that holds a lone surrogate: JSON's
    ``\\ud800`` escape parses, but it is no Unicode text and fails every encoder later."""
    stack: list[tuple[list[str | int], Any]] = [([], payload)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                if not _is_text(key):
                    _lone_surrogate(loc)
                stack.append(([*loc, key], child))
        elif isinstance(value, list):
            stack.extend(([*loc, i], child) for i, child in enumerate(value))
        elif isinstance(value, str) and not _is_text(value):
            _lone_surrogate(loc)


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(loc: list[str | int]) -> None:
    where = ".".join(map(str, loc)) or "body"
    msg = "contains a lone UTF-16 surrogate (not valid Unicode)"
    raise ServiceError(
        422,
        f"{where}: {msg}",
        details=[{"loc": loc, "msg": msg, "type": "lone_surrogate"}],
    )


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or ``application/<x>+json``, whatever the parameters (charset)."""
    media_type = content_type.partition(";")[0].strip().lower()
    kind, _, subtype = media_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON. A browser sends ``text/plain`` (or no type) to any
    origin without a CORS preflight, so scoring such bodies would let any web page use a local
    service; JSON clients (httpx ``json=``, ``requests.post(json=...)``) always declare it."""
    content_type = request.headers.get("content-type", "")
    if not is_json_media_type(content_type):
        raise ServiceError(
            415,
            f"the body must be application/json (Content-Type: {content_type or 'none'})",
            details={"content_type": content_type or None, "accepted": ["application/json"]},
        )


async def parse_body(
    request: Request, model: type[BodyT], settings: Settings, items_field: str = "items"
) -> BodyT:
    """Read, bound and validate a JSON body with the envelope on every failure;
    ``items_field`` is the list that ``CRS_MAX_ITEMS_PER_REQUEST`` bounds."""
    require_json(request)
    payload = await read_json(request, settings.max_body_bytes, settings.body_timeout_s)
    check_item_count(payload, items_field, settings.max_items_per_request)
    refuse_lone_surrogates(payload)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
