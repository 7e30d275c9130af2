"""The OpenAPI document: bodies that routes parse themselves (to bound them first), and every
error an operation answers, in the envelope, with its headers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api.errors import ERROR_TYPES, ErrorEnvelope

REF = "#/components/schemas/{model}"

# What each error status means here (DESIGN.md 4); the envelope's type is ERROR_TYPES[status].
STATUS_MEANINGS: dict[int, str] = {
    401: "missing or invalid bearer token (the API token when CRS_API_TOKENS is set; the admin "
    "token on /admin)",
    404: "no such model name, model version or stored prompt",
    408: "the request body did not arrive in time",
    409: "conflict: the pinned model version is not loaded, a baseline is missing under "
    "on_missing error, a stored value cannot be used, or a model's state (or another admin "
    "operation on it) refuses the operation",
    413: "the body or its item count exceeds the limits",
    415: "the body is not declared application/json",
    422: "the request is invalid; details name each bad field",
    429: "overloaded: retry after Retry-After seconds",
    500: "internal error (the traceback is in the service log, never here)",
    503: "not ready (model loading, draining), the baseline store failed, or an activation's "
    "rebaseline failed (the previous version stays active)",
    504: "the request timed out in the queue or on the device",
    507: "the baseline store is out of memory (retrying does not help)",
}
HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"required": True, "schema": {"type": "string"}}},
    503: {"Retry-After": {"required": False, "schema": {"type": "string"}}},
}

# The error statuses of each operation besides 500 (which every one may answer); 401 marks those
# the API token guards, documented only when tokens are set. tests/unit/test_openapi_contract.py
# checks that every operation is listed and that 401 is where the guard is; schemathesis checks
# that nothing else is answered.
BODY_ERRORS = (408, 413, 415, 422)
SCORING_ERRORS = (429, 503, 504)
STORE_ERRORS = (503, 507)
OPERATION_ERRORS: dict[str, tuple[int, ...]] = {
    "GET /livez": (503,),
    "GET /readyz": (503,),
    "GET /metrics": (),
    "POST /v1/rewards": (401, 404, *BODY_ERRORS, 409, *SCORING_ERRORS),
    "PUT /v1/baselines": (401, 404, *BODY_ERRORS, 409, *SCORING_ERRORS, *STORE_ERRORS),
    "GET /v1/baselines": (401, 404, 422, *STORE_ERRORS),
    "GET /v1/baselines/{prompt_id}": (401, 404, 422, *STORE_ERRORS),
    "DELETE /v1/baselines/{prompt_id}": (401, 404, 422, *STORE_ERRORS),
    "POST /get_reward": (401, 404, *BODY_ERRORS, *SCORING_ERRORS),
    "GET /v1/models": (401,),
    "POST /admin/models": (401, *BODY_ERRORS, 409, 503),
    "POST /admin/models/{version}/activate": (401, 404, *BODY_ERRORS, 409, 503),
    "DELETE /admin/models/{version}": (401, 404, 409, 422, 503),
}
# Guarded by the admin token whenever they exist (they exist only when it is set).
ADMIN_PREFIX = "/admin/"
# FastAPI's own 422 schemas, replaced by the envelope.
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route whose JSON body is ``model``."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def with_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> Callable[[], dict[str, Any]]:
    """An ``app.openapi`` that also lists the body models among the component schemas and
    documents every operation's errors in the envelope."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            documented: list[type[BaseModel]] = [*models, ErrorEnvelope]
            for model in documented:
                add_component(components, model)
            auth_on = bool(app.state.services.settings.api_tokens)
            document_errors(spec, auth_on=auth_on)
            app.openapi_schema = spec
        return app.openapi_schema

    return openapi


def add_component(components: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema


def document_errors(spec: dict[str, Any], *, auth_on: bool) -> None:
    """Every operation's error responses, with the bearer scheme where the token guards it."""
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            statuses = {*OPERATION_ERRORS.get(f"{method.upper()} {path}", ()), 500}
            if path.startswith(ADMIN_PREFIX):
                operation["security"] = [{"admin_bearer": []}]
            elif 401 in statuses and auth_on:
                operation["security"] = [{"bearer": []}]
            elif 401 in statuses:
                statuses.remove(401)
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):
                responses[str(status)] = error_response(status)
    schemes = spec["components"].setdefault("securitySchemes", {})
    if auth_on:
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
    if any(path.startswith(ADMIN_PREFIX) for path in spec.get("paths", {})):
        schemes["admin_bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "CRS_ADMIN_TOKEN",
        }
    if not schemes:
        del spec["components"]["securitySchemes"]
    components = spec["components"]["schemas"]
    for name in FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)


def error_response(status: int) -> dict[str, Any]:
    """One documented error status: the envelope, and the headers it always or may carry."""
    kind = ERROR_TYPES.get(status, "error")
    response: dict[str, Any] = {
        "description": f"{kind}: {STATUS_MEANINGS.get(status, kind)}",
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorEnvelope")}}},
    }
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response
