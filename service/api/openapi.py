"""OpenAPI documentation for bodies that routes parse themselves (to bound them first)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route whose JSON body is ``model``."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def with_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> Callable[[], dict[str, Any]]:
    """An ``app.openapi`` that also lists the body models among the component schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=REF)
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    return openapi
