"""POST /v1/rewards served directly (``service.api.direct``) answers as FastAPI's own route does.

Two apps on one fake engine type, one with the direct route and one without, get the same
requests; status, headers and body must match byte for byte, whatever the request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, Request
from fastapi.routing import APIRoute
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.direct import DirectRoutes, check_direct
from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tests.unit.fake_engine import FakeEngine, LiveApp, serve
from tests.unit.test_api_fuzz import FUZZ, json_values, valid_requests, wrong_requests

TOKEN = "direct-route-token"
AUTH = {
    "valid": {"authorization": f"Bearer {TOKEN}"},
    "wrong": {"authorization": "Bearer not-the-token"},
    "none": {},
}


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[LiveApp, LiveApp]]:
    """The direct app and the framework's, both requiring a token."""
    settings = Settings(api_tokens=TOKEN)
    direct = LiveApp(settings=settings)
    framework = LiveApp(settings=settings, direct_routes=False)
    yield direct, framework
    direct.close()
    framework.close()


def assert_same_answer(ours: httpx.Response, theirs: httpx.Response) -> None:
    assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
    assert ours.content == theirs.content
    assert ours.headers.multi_items() == theirs.headers.multi_items()


def both(
    pair: tuple[LiveApp, LiveApp], method: str, path: str, **options: Any
) -> tuple[httpx.Response, httpx.Response]:
    direct, framework = pair
    return direct.request(method, path, **options), framework.request(method, path, **options)


bodies = (
    valid_requests.map(lambda body: json.dumps(body).encode())
    | wrong_requests.map(lambda body: json.dumps(body).encode())
    | json_values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=100)
)


@FUZZ
@given(content=bodies, auth=st.sampled_from(["valid", "valid", "valid", "wrong", "none"]))
def test_any_request_gets_the_framework_routes_answer(
    pair: tuple[LiveApp, LiveApp], content: bytes, auth: str
) -> None:
    ours, theirs = both(pair, "POST", "/v1/rewards", content=content, headers=AUTH[auth])
    assert_same_answer(ours, theirs)


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("POST", "/v1/rewards", "application/json"),
        ("POST", "/v1/rewards", "text/plain"),
        ("POST", "/v1/rewards?model=other", "application/json"),
        ("POST", "/v1/rewards/", "application/json"),
        ("POST", "/v1/reward", "application/json"),
        ("GET", "/v1/rewards", "application/json"),
        ("PUT", "/v1/rewards", "application/json"),
        ("OPTIONS", "/v1/rewards", "application/json"),
        ("HEAD", "/v1/rewards", "application/json"),
    ],
)
def test_other_methods_and_paths_answer_alike(
    pair: tuple[LiveApp, LiveApp], method: str, path: str, content_type: str
) -> None:
    body = json.dumps({"items": [{"prompt": "p", "response": "r"}], "contrastive": None})
    headers = {**AUTH["valid"], "content-type": content_type}
    ours, theirs = both(pair, method, path, content=body.encode(), headers=headers)
    assert_same_answer(ours, theirs)


class SeenByFramework:
    """Middleware inside the framework's stack: records the paths that went through it."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


@pytest.mark.parametrize("direct_routes", [True, False])
def test_scoring_skips_the_framework_stack_and_the_rest_does_not(direct_routes: bool) -> None:
    seen: list[str] = []

    async def body() -> list[int]:
        engine = FakeEngine()
        app = create_app(Settings(), engine_factory=lambda *_: engine, direct_routes=direct_routes)
        app.add_middleware(SeenByFramework, seen=seen)
        async with serve(app) as client:
            await engine.wait_settled()
            item = {"prompt": "p", "response": "r"}
            scored = await client.post("/v1/rewards", json={"items": [item]})
            alive = await client.get("/livez")
            refused = await client.get("/v1/rewards")
        return [scored.status_code, alive.status_code, refused.status_code]

    assert asyncio.run(body()) == [200, 200, 405]
    framework_only = ["GET /livez", "GET /v1/rewards"]
    assert seen == (framework_only if direct_routes else ["POST /v1/rewards", *framework_only])


def requests_counted(metrics: str, status: str) -> float:
    wanted = f'crs_requests_total{{method="POST",route="/v1/rewards",status="{status}"}}'
    for line in metrics.splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_direct_requests_are_counted_and_timed_by_route() -> None:
    async def body() -> str:
        engine = FakeEngine()
        async with serve(create_app(Settings(), engine_factory=lambda *_: engine)) as client:
            await engine.wait_settled()
            for _ in range(2):
                await client.post("/v1/rewards", json={"items": [{"prompt": "p", "response": "r"}]})
            await client.post("/v1/rewards", json={"items": "none"})
            return (await client.get("/metrics")).text

    metrics = asyncio.run(body())
    assert requests_counted(metrics, "200") == 2
    assert requests_counted(metrics, "422") == 1
    assert 'crs_request_seconds_count{route="/v1/rewards"} 3.0' in metrics
    assert "crs_requests_in_flight 1.0" in metrics  # the scrape itself


class FakeApp:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("not called")


class Answer(BaseModel):
    value: int


async def takes_request(request: Request) -> Answer:
    return Answer(value=1)


async def takes_a_query(request: Request, limit: int = 1) -> Answer:
    return Answer(value=limit)


def takes_request_sync(request: Request) -> Answer:
    return Answer(value=1)


async def answers_a_dict(request: Request) -> dict[str, int]:
    return {"value": 1}


async def needs_nothing() -> None:
    return None


def test_a_direct_route_serves_an_endpoint_that_takes_the_request_alone() -> None:
    route = APIRoute("/answer", takes_request, methods=["POST"])
    check_direct(route)
    direct = DirectRoutes(SeenByFramework(FakeApp(), []), [route], Metrics())
    assert direct.routes == {("POST", "/answer"): route}


@pytest.mark.parametrize(
    "route",
    [
        APIRoute("/answer", takes_a_query, methods=["POST"]),
        APIRoute("/answer", takes_request_sync, methods=["POST"]),
        APIRoute("/answer", answers_a_dict, methods=["POST"]),
        APIRoute("/answer", takes_request, methods=["POST"], dependencies=[Depends(needs_nothing)]),
    ],
    ids=["query-parameter", "sync", "not-a-model", "dependency"],
)
def test_endpoints_the_framework_must_feed_are_refused(route: APIRoute) -> None:
    with pytest.raises(ValueError, match="direct route"):
        check_direct(route)
