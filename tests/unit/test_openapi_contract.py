"""The OpenAPI document says what the API does: every error status in the envelope, the real
patterns, ``/metrics`` as text, 405 with every method of the path, 415 for bodies that are not
JSON, and schemathesis finds no answer that the document does not describe."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given

from service.api.openapi import OPERATION_ERRORS
from service.api.schemas import AGGREGATE
from service.app import create_app
from service.settings import Settings
from tests.contract import CHECKS, bounded
from tests.unit.fake_engine import FakeEngine, serve

TOKEN = "contract-token-0123"
ADMIN_TOKEN = "contract-admin-token-0123"
# Bounded: every operation, about a second each on two cores.
CONTRACT = bounded(25)


def make_app(**overrides: Any) -> Any:
    """An app with the admin plane on (its routes are documented and fuzzed like the rest)."""
    settings = Settings(**{"admin_token": ADMIN_TOKEN, **overrides})
    return create_app(settings, engine_factory=lambda *_: FakeEngine())


def spec_of(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = make_app(**overrides).openapi()
    return spec


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# --- the document -------------------------------------------------------------------------------


def test_every_operation_is_in_the_error_table() -> None:
    documented = {f"{method} {path}" for method, path, _ in operations(spec_of())}
    assert documented == set(OPERATION_ERRORS)


@pytest.mark.parametrize("auth_on", [False, True], ids=["auth-off", "auth-on"])
def test_every_error_status_is_documented_in_the_envelope(auth_on: bool) -> None:
    spec = spec_of(api_tokens=TOKEN) if auth_on else spec_of()
    assert "ErrorEnvelope" in spec["components"]["schemas"]
    for method, path, operation in operations(spec):
        expected = {*OPERATION_ERRORS[f"{method} {path}"], 500}
        if not auth_on and not path.startswith("/admin/"):
            expected.discard(401)
        errors = {int(code) for code in operation["responses"] if int(code) >= 400}
        assert errors == expected, (method, path)
        for code in errors:
            content = operation["responses"][str(code)]["content"]
            assert content == {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}
            }, (method, path, code)
        if 429 in errors:
            assert operation["responses"]["429"]["headers"]["Retry-After"]["required"] is True
        assert ("security" in operation) == (401 in errors), (method, path)
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_the_aggregate_is_documented_with_its_real_pattern() -> None:
    schema = spec_of()["components"]["schemas"]["ContrastiveOptions"]["properties"]["aggregate"]
    pattern = re.compile(schema["pattern"])
    for value in ["mean", "median", "min", "max", "quantile:0", "quantile:0.25", "quantile:1.0"]:
        assert pattern.search(value), value
        assert AGGREGATE.fullmatch(value), value
    for value in ["avg", "quantile:2", "quantile:", "mean ", "quantile:0.\u0665", "xmean"]:
        assert not pattern.search(value), value
        assert not AGGREGATE.fullmatch(value), value


def test_metrics_are_documented_as_text() -> None:
    ok = spec_of()["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/plain"]


# --- 405 and 415 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v1/baselines", "GET, PUT"),
        ("PATCH", "/v1/baselines/some/id", "DELETE, GET"),
        ("PUT", "/v1/baselines/x", "DELETE, GET"),
        ("GET", "/get_reward", "POST"),
        ("DELETE", "/v1/rewards", "POST"),
        ("POST", "/metrics", "GET"),
    ],
)
def test_405_lists_every_method_of_the_path(method: str, path: str, allowed: str) -> None:
    async def body() -> None:
        async with serve(make_app()) as client:
            response = await client.request(method, path)
            assert response.status_code == 405
            assert response.headers["allow"] == allowed
            error = response.json()["error"]
            assert error["type"] == "method_not_allowed"
            assert error["details"] == {"method": method, "allowed": allowed.split(", ")}

    run(body())


BODY_ROUTES = [("POST", "/v1/rewards"), ("PUT", "/v1/baselines"), ("POST", "/get_reward")]
BODIES = {
    "/v1/rewards": {"items": []},
    "/v1/baselines": {"items": []},
    "/get_reward": {"query": []},
}


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
        "application/jsonx",
        "text/json",
    ],
)
def test_a_body_that_is_not_declared_json_gets_415(
    method: str, path: str, content_type: str | None
) -> None:
    # A browser sends text/plain, forms or no type cross-origin without a preflight.
    headers = {} if content_type is None else {"content-type": content_type}

    async def body() -> None:
        async with serve(make_app()) as client:
            content = httpx.Request("POST", "/", json=BODIES[path]).content
            response = await client.request(method, path, content=content, headers=headers)
            assert response.status_code == 415, response.text
            assert response.json()["error"]["type"] == "unsupported_media_type"

    run(body())


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/x+json",
    ],
)
def test_json_bodies_are_accepted_with_parameters(
    method: str, path: str, content_type: str
) -> None:
    async def body() -> None:
        async with serve(make_app()) as client:
            content = httpx.Request("POST", "/", json=BODIES[path]).content
            headers = {"content-type": content_type}
            response = await client.request(method, path, content=content, headers=headers)
            assert response.status_code == 200, response.text

    run(body())


def test_auth_comes_before_the_media_type() -> None:
    async def body() -> None:
        async with serve(make_app(api_tokens=TOKEN)) as client:
            response = await client.post("/v1/rewards", content=b"{}")
            assert response.status_code == 401

    run(body())


@pytest.mark.parametrize(("method", "template"), [(m, p) for m, p, _ in operations(spec_of())])
def test_401_is_documented_exactly_where_the_token_is_required(method: str, template: str) -> None:
    documented = 401 in OPERATION_ERRORS[f"{method} {template}"]
    path = template.replace("{prompt_id}", "p").replace("{version}", "rm@0")

    async def body() -> None:
        async with serve(make_app(api_tokens=TOKEN)) as client:
            response = await client.request(method, path)
            assert (response.status_code == 401) == documented, response.text

    run(body())


# --- schemathesis against the app in process -----------------------------------------------------
# Its pytest plugin does not run under pytest 9 (it reads a removed attribute), so each operation
# is one parametrized test drawing schemathesis's cases through hypothesis.


@pytest.fixture
def asgi_schema() -> Any:
    # One app per test: schemathesis's plugin ends the app's lifespan after each test.
    return schemathesis.openapi.from_asgi("/openapi.json", make_app())


# Negative cases (schema-violating inputs) exist only where there are inputs: a body or a path.
CASES = [(label, schemathesis.GenerationMode.POSITIVE) for label in sorted(OPERATION_ERRORS)] + [
    (label, schemathesis.GenerationMode.NEGATIVE)
    for label in sorted(OPERATION_ERRORS)
    if "{" in label or 415 in OPERATION_ERRORS[label]
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode}" for label, mode in CASES])
def test_every_operation_answers_as_documented(
    asgi_schema: Any, label: str, mode: schemathesis.GenerationMode
) -> None:
    method, path = label.split(" ", 1)
    operation = asgi_schema[path][method]

    @CONTRACT
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_as_documented(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    answers_as_documented()
