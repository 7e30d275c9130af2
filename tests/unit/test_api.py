"""The HTTP API (DESIGN.md 4) over a fake engine, with the app's lifespan really running."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.scoring.types import NonFiniteReward
from service.settings import Settings
from tests.unit.fake_engine import FAKE_NAME, FAKE_VERSION, FakeEngine, serve

TOKENS = "tok-aaaaaaaa,tok-bbbbbbbb"
GOOD = {"items": [{"prompt": "What is 2+2?", "response": "four"}]}
ENVELOPE_KEYS = {"type", "message", "details"}


def run(test: Coroutine[Any, Any, None]) -> None:
    """Run one async test body in a fresh event loop (no pytest-asyncio here)."""
    asyncio.run(test)


def make_app(
    engine: FakeEngine,
    on_fatal: Callable[[BaseException], None] | None = None,
    **settings: Any,
) -> FastAPI:
    return create_app(Settings(**settings), engine_factory=lambda *_: engine, on_fatal=on_fatal)


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


async def post(
    client: httpx.AsyncClient,
    body: Any,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /v1/rewards with ``body`` as raw bytes, or serialised as JSON otherwise."""
    content = body if isinstance(body, bytes) else as_json(body)
    all_headers = {"content-type": "application/json", **(headers or {})}
    return await client.post("/v1/rewards", content=content, headers=all_headers)


def assert_envelope(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    """The response is the error envelope with that status and type; returns its error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == ENVELOPE_KEYS
    assert error["type"] == error_type
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def assert_good_request_succeeds(client: httpx.AsyncClient) -> None:
    response = await post(client, GOOD)
    assert response.status_code == 200, response.text
    assert [r["reward"] for r in response.json()["results"]] == [pytest.approx(0.4)]


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def metric(text: str, sample_name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample of a Prometheus text exposition, or None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and (labels is None or sample.labels == labels):
                return float(sample.value)
    return None


def sha256_id(canonical: str) -> str:
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def result(
    reward: float,
    tokens: int,
    *,
    truncated: bool = False,
    source: str | None = "missing",
    contrastive: float | None = None,
) -> dict[str, Any]:
    """One expected result; no baseline store yet, so never a baseline."""
    return {
        "reward": pytest.approx(reward),
        "baseline": None,
        "contrastive": contrastive if contrastive is None else pytest.approx(contrastive),
        "baseline_n": 0,
        "baseline_source": source,
        "tokens": tokens,
        "truncated": truncated,
    }


# --- good requests ----------------------------------------------------------------------------


def test_good_request_gives_one_result_per_item_in_request_order() -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    request = {
        "items": [
            {"prompt": "Say hi", "response": "hello there"},
            {"prompt": chat, "response": "hi"},
            {"prompt": "Count", "response": "one two three four five", "prompt_id": "p-3"},
        ]
    }

    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, request)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "model": {"name": FAKE_NAME, "version": FAKE_VERSION, "state": "active"},
            "results": [result(1.1, 6), result(0.7, 7), result(2.3, 8)],
        }
        [call] = engine.calls
        assert call.truncation == "none"
        assert [item.prompt for item in call.items] == ["Say hi", chat, "Count"]
        assert [item.response for item in call.items] == [
            "hello there",
            "hi",
            "one two three four five",
        ]

    run(body())


@pytest.mark.parametrize(
    ("prompt", "reward", "tokens"),
    [
        pytest.param("Tell me a joke", 1.2, 9, id="string"),
        pytest.param([{"role": "user", "content": "Tell me a joke"}], 1.7, 9, id="messages"),
        pytest.param(
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Joke?"},
                {"role": "assistant", "content": "No."},
                {"role": "user", "content": "Please"},
            ],
            1.7,
            11,
            id="conversation",
        ),
        pytest.param([{"role": "tool", "content": ""}], 1.7, 5, id="empty-message-content"),
        pytest.param("¿Qué tal? 你好 🙂", 1.2, 9, id="unicode"),
    ],
)
def test_prompt_string_or_messages(prompt: Any, reward: float, tokens: int) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(
                client, {"items": [{"prompt": prompt, "response": "Why not then"}]}
            )
        assert response.status_code == 200, response.text
        assert response.json()["results"] == [result(reward, tokens)]

    run(body())


@pytest.mark.parametrize(
    ("contrastive", "expected"),
    [
        pytest.param({}, result(0.4, 6), id="defaults"),
        pytest.param({"on_missing": "null"}, result(0.4, 6), id="on-missing-null"),
        pytest.param({"on_missing": "raw"}, result(0.4, 6, contrastive=0.4), id="on-missing-raw"),
        pytest.param(
            {"aggregate": "quantile:0.9", "normalize": "std", "on_missing": "raw"},
            result(0.4, 6, contrastive=0.4),
            id="all-options",
        ),
        pytest.param(None, result(0.4, 6, source=None), id="contrastive-null"),
    ],
)
def test_contrastive_options_without_baselines(
    contrastive: dict[str, Any] | None, expected: dict[str, Any]
) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, {**GOOD, "contrastive": contrastive})
        assert response.status_code == 200, response.text
        assert response.json()["results"] == [expected]

    run(body())


@pytest.mark.parametrize(
    "request_body",
    [
        pytest.param({"items": []}, id="plain"),
        pytest.param({"items": [], "contrastive": {"on_missing": "error"}}, id="on-missing-error"),
        pytest.param({"items": [], "model_version": FAKE_VERSION}, id="pinned"),
    ],
)
def test_empty_items_give_empty_results(request_body: dict[str, Any]) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, request_body)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "model": {"name": FAKE_NAME, "version": FAKE_VERSION, "state": "active"},
            "results": [],
        }
        assert engine.items_scored == 0

    run(body())


# --- bad requests -----------------------------------------------------------------------------


def item(**fields: Any) -> dict[str, Any]:
    """A request of one item: a good one with ``fields`` replaced."""
    return {"items": [{"prompt": "p", "response": "r", **fields}]}


def options(**fields: Any) -> dict[str, Any]:
    return {**GOOD, "contrastive": fields}


# (body, loc): loc is a prefix that some entry of details[*].loc must start with, or None when
# the body is not JSON at all (details are then null).
BAD_BODIES = [
    pytest.param(b'{"items": [', None, id="malformed-json"),
    pytest.param(b"", None, id="empty-body"),
    pytest.param(b"{'items': []}", None, id="single-quoted-json"),
    pytest.param(b'{"items": ["\xff"]}', None, id="invalid-utf8"),
    pytest.param(b'{"items": [], "x": 1} trailing', None, id="trailing-garbage"),
    pytest.param(as_json([GOOD]), [], id="body-a-list"),
    pytest.param(as_json("items"), [], id="body-a-string"),
    pytest.param(as_json(None), [], id="body-null"),
    pytest.param(as_json(42), [], id="body-a-number"),
    pytest.param(as_json({}), ["items"], id="items-missing"),
    pytest.param(as_json({"items": "abc"}), ["items"], id="items-a-string"),
    pytest.param(as_json({"items": None}), ["items"], id="items-null"),
    pytest.param(as_json({"items": {"prompt": "p"}}), ["items"], id="items-an-object"),
    pytest.param(as_json({"items": ["p"]}), ["items", 0], id="item-a-string"),
    pytest.param(as_json(item(response=5)), ["items", 0, "response"], id="response-a-number"),
    pytest.param(as_json(item(response=None)), ["items", 0, "response"], id="response-null"),
    pytest.param(as_json({"items": [{"prompt": "p"}]}), ["items", 0, "response"], id="no-response"),
    pytest.param(as_json(item(prompt=7)), ["items", 0, "prompt"], id="prompt-a-number"),
    pytest.param(as_json(item(prompt="")), ["items", 0, "prompt"], id="empty-prompt"),
    pytest.param(as_json(item(prompt=[])), ["items", 0, "prompt"], id="empty-message-list"),
    pytest.param(
        as_json(item(prompt=[{"role": "wizard", "content": "hi"}])),
        ["items", 0, "prompt"],
        id="bad-role",
    ),
    pytest.param(
        as_json(item(prompt=[{"role": "user"}])), ["items", 0, "prompt"], id="message-no-content"
    ),
    pytest.param(
        as_json(item(prompt=[{"role": "user", "content": 3}])),
        ["items", 0, "prompt"],
        id="message-content-a-number",
    ),
    pytest.param(
        as_json(item(prompt=[{"role": "user", "content": "hi", "name": "x"}])),
        ["items", 0, "prompt"],
        id="message-extra-field",
    ),
    pytest.param(
        b'{"items": [{"prompt": "\\ud800", "response": "r"}]}',
        ["items", 0, "prompt"],
        id="lone-surrogate",
    ),
    pytest.param(as_json(item(prompt_id="")), ["items", 0, "prompt_id"], id="empty-prompt-id"),
    pytest.param(as_json(item(reward=1.0)), ["items", 0, "reward"], id="unknown-item-field"),
    pytest.param(as_json({**GOOD, "temperature": 0.7}), ["temperature"], id="unknown-field"),
    pytest.param(as_json({**GOOD, "model_version": ""}), ["model_version"], id="empty-version"),
    pytest.param(as_json({**GOOD, "model_version": 3}), ["model_version"], id="version-a-number"),
    pytest.param(as_json({**GOOD, "truncation": "right"}), ["truncation"], id="bad-truncation"),
    pytest.param(as_json({**GOOD, "contrastive": "mean"}), ["contrastive"], id="options-a-string"),
    pytest.param(
        as_json(options(aggregate="quantile:2")), ["contrastive", "aggregate"], id="quantile-2"
    ),
    pytest.param(
        as_json(options(aggregate="quantile:-0.1")),
        ["contrastive", "aggregate"],
        id="quantile-negative",
    ),
    pytest.param(as_json(options(aggregate="quantile:")), ["contrastive", "aggregate"], id="q-"),
    pytest.param(as_json(options(aggregate="avg")), ["contrastive", "aggregate"], id="avg"),
    pytest.param(as_json(options(aggregate="MEAN")), ["contrastive", "aggregate"], id="MEAN"),
    pytest.param(as_json(options(aggregate="")), ["contrastive", "aggregate"], id="aggregate-''"),
    pytest.param(
        as_json(options(aggregate="mean\n")),
        ["contrastive", "aggregate"],
        id="aggregate-trailing-newline",
    ),
    pytest.param(as_json(options(normalize="zscore")), ["contrastive", "normalize"], id="zscore"),
    pytest.param(as_json(options(on_missing="drop")), ["contrastive", "on_missing"], id="drop"),
    pytest.param(as_json(options(baseline=1)), ["contrastive", "baseline"], id="unknown-option"),
    pytest.param(
        b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
        id="deeply-nested-json",
    ),
    pytest.param(
        b'{"items": [], "model_version": ' + b"9" * 5000 + b"}",
        None,
        id="5000-digit-integer",
    ),
]


@pytest.mark.parametrize(("content", "loc"), BAD_BODIES)
def test_bad_body_gets_422_envelope_then_a_good_request_succeeds(
    content: bytes, loc: list[str | int] | None
) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, content)
            error = assert_envelope(response, 422, "validation_error")
            if loc is None:
                assert error["details"] is None
            else:
                details = error["details"]
                assert details
                # Each entry names the field; the (possibly huge) input is not echoed.
                assert all(set(entry) == {"loc", "msg", "type"} for entry in details), details
                assert any(entry["loc"][: len(loc)] == loc for entry in details), details
            assert engine.calls == []
            await assert_good_request_succeeds(client)

    run(body())


@pytest.mark.parametrize("count", [4, 50])
def test_too_many_items_413_before_the_engine(count: int) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine, max_items_per_request=3)) as client:
            await engine.wait_settled()
            items = [{"prompt": "p", "response": f"r{i}"} for i in range(count)]
            response = await post(client, {"items": items})
            error = assert_envelope(response, 413, "payload_too_large")
            assert error["details"] == {"items": count, "max_items_per_request": 3}
            assert engine.calls == []
            response = await post(client, {"items": items[:3]})
            assert response.status_code == 200, response.text
            assert len(response.json()["results"]) == 3

    run(body())


MAX_BODY = 1024


def body_of_size(size: int) -> bytes:
    """A valid request serialised to exactly ``size`` bytes."""
    empty = as_json({"items": [{"prompt": "p", "response": ""}]})
    content = as_json({"items": [{"prompt": "p", "response": "x" * (size - len(empty))}]})
    assert len(content) == size
    return content


async def chunks(content: bytes, size: int = 100) -> AsyncIterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    ("size", "status"),
    [pytest.param(MAX_BODY, 200, id="at-limit"), pytest.param(MAX_BODY + 1, 413, id="over")],
)
def test_body_size_limit(streamed: bool, size: int, status: int) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine, max_body_bytes=MAX_BODY)) as client:
            await engine.wait_settled()
            content = body_of_size(size)
            request = client.build_request(
                "POST",
                "/v1/rewards",
                content=chunks(content) if streamed else content,
                headers={"content-type": "application/json"},
            )
            if streamed:
                assert "content-length" not in request.headers
                assert request.headers["transfer-encoding"] == "chunked"
            else:
                assert request.headers["content-length"] == str(size)
            response = await client.send(request)
            if status == 413:
                assert_envelope(response, 413, "payload_too_large")
                assert engine.calls == []
                await assert_good_request_succeeds(client)
            else:
                assert response.status_code == 200, response.text
                assert engine.items_scored == 1

    run(body())


LONG_RESPONSE = " ".join(["word"] * 20)  # 1 prompt word + 20 + 2 = 23 tokens


@pytest.mark.parametrize(
    ("default", "requested"),
    [pytest.param("none", None, id="default-none"), pytest.param("left", "none", id="asked-none")],
)
def test_over_long_item_422_names_the_item(default: str, requested: str | None) -> None:
    async def body() -> None:
        engine = FakeEngine(max_input_tokens=8)
        async with serve(make_app(engine, truncation=default)) as client:
            await engine.wait_settled()
            items = [
                {"prompt": "p", "response": "short"},
                {"prompt": "p", "response": LONG_RESPONSE},
                {"prompt": "p", "response": "short again"},
            ]
            response = await post(client, {"items": items, "truncation": requested})
            error = assert_envelope(response, 422, "validation_error")
            assert error["details"] == {
                "items": [{"index": 1, "tokens": 23}],
                "max_input_tokens": 8,
            }
            assert "item 1 has 23 tokens" in error["message"]
            await assert_good_request_succeeds(client)

    run(body())


@pytest.mark.parametrize(
    ("default", "requested"),
    [pytest.param("none", "left", id="asked-left"), pytest.param("left", None, id="default-left")],
)
def test_truncation_left_scores_the_tail(default: str, requested: str | None) -> None:
    async def body() -> None:
        engine = FakeEngine(max_input_tokens=8)
        async with serve(make_app(engine, truncation=default)) as client:
            await engine.wait_settled()
            items = [
                {"prompt": "p", "response": "short"},
                {"prompt": "p", "response": LONG_RESPONSE},
            ]
            response = await post(client, {"items": items, "truncation": requested})
        assert response.status_code == 200, response.text
        assert response.json()["results"] == [
            result(0.5, 4),
            result(len(LONG_RESPONSE) / 10, 8, truncated=True),
        ]
        assert [call.truncation for call in engine.calls] == ["left"]

    run(body())


def test_model_version_mismatch_409() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, {**GOOD, "model_version": "fake-rm@ffffffffffff"})
            error = assert_envelope(response, 409, "conflict")
            assert error["details"] == {
                "reason": "version_not_loaded",
                "requested": "fake-rm@ffffffffffff",
                "active": FAKE_VERSION,
                "loaded": [FAKE_VERSION],
            }
            assert engine.calls == []
            response = await post(client, {**GOOD, "model_version": FAKE_VERSION})
            assert response.status_code == 200, response.text
            assert response.json()["model"]["version"] == FAKE_VERSION

    run(body())


@pytest.mark.parametrize(
    ("items", "missing"),
    [
        pytest.param(
            [{"prompt": "What is 2+2?", "response": "4"}],
            [sha256_id("What is 2+2?")],
            id="string",
        ),
        pytest.param(
            [{"prompt": "héllo wörld ✓", "response": "4"}],
            [sha256_id("héllo wörld ✓")],
            id="unicode-string",
        ),
        pytest.param(
            [{"prompt": [{"role": "user", "content": "Hi"}], "response": "4"}],
            [sha256_id('[{"content":"Hi","role":"user"}]')],
            id="messages",
        ),
        pytest.param(
            [{"prompt": [{"content": "¿Qué?", "role": "user"}], "response": "4"}],
            [sha256_id('[{"content":"¿Qué?","role":"user"}]')],
            id="unicode-messages",
        ),
        pytest.param(
            [{"prompt": "What is 2+2?", "response": "4", "prompt_id": "math-0007"}],
            ["math-0007"],
            id="given-prompt-id",
        ),
        pytest.param(
            [
                {"prompt": "b", "response": "1"},
                {"prompt": "a", "response": "2", "prompt_id": "zz-last"},
                {"prompt": "b", "response": "3"},
            ],
            sorted([sha256_id("b"), "zz-last"]),
            id="deduplicated-and-sorted",
        ),
    ],
)
def test_on_missing_error_409_lists_prompt_ids(
    items: list[dict[str, Any]], missing: list[str]
) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            request = {"items": items, "contrastive": {"on_missing": "error"}}
            response = await post(client, request)
            error = assert_envelope(response, 409, "conflict")
            assert error["details"] == {"missing_prompt_ids": missing}
            assert engine.calls == []
            await assert_good_request_succeeds(client)

    run(body())


@pytest.mark.parametrize(
    ("method", "path", "status", "error_type"),
    [
        pytest.param("GET", "/v1/rewards", 405, "method_not_allowed", id="wrong-method"),
        pytest.param("GET", "/v1/nothing-here", 404, "not_found", id="unknown-route"),
    ],
)
def test_routing_errors_use_the_envelope(
    method: str, path: str, status: int, error_type: str
) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await client.request(method, path)
        assert_envelope(response, status, error_type)

    run(body())


# --- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "content", "message"),
    [
        pytest.param({}, as_json(GOOD), "missing bearer token", id="missing-header"),
        pytest.param(
            {"authorization": "Bearer tok-cccccccc"},
            as_json(GOOD),
            "invalid bearer token",
            id="wrong-token",
        ),
        pytest.param(
            {"authorization": "Bearer tok-aaaaaaa"},
            as_json(GOOD),
            "invalid bearer token",
            id="prefix-of-a-token",
        ),
        pytest.param(
            {"authorization": f"Bearer {TOKENS}"},
            as_json(GOOD),
            "invalid bearer token",
            id="the-whole-list",
        ),
        pytest.param(
            {"authorization": "Basic tok-aaaaaaaa"},
            as_json(GOOD),
            "missing bearer token",
            id="wrong-scheme",
        ),
        pytest.param(
            {"authorization": "tok-aaaaaaaa"}, as_json(GOOD), "missing bearer token", id="no-scheme"
        ),
        pytest.param(
            {"authorization": "Bearer  "}, as_json(GOOD), "missing bearer token", id="empty-token"
        ),
        pytest.param({}, b"{not json", "missing bearer token", id="before-parsing-the-body"),
    ],
)
def test_unauthorized_401(headers: dict[str, str], content: bytes, message: str) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine, api_tokens=TOKENS)) as client:
            await engine.wait_settled()
            response = await post(client, content, headers=headers)
            error = assert_envelope(response, 401, "unauthorized")
            assert error["message"] == message
            assert response.headers["www-authenticate"] == "Bearer"
            assert "tok-" not in response.text
            assert engine.calls == []

    run(body())


@pytest.mark.parametrize(
    "authorization",
    ["Bearer tok-aaaaaaaa", "Bearer tok-bbbbbbbb", "bearer tok-bbbbbbbb"],
    ids=["old-token", "new-token", "lowercase-scheme"],
)
def test_rotated_tokens_are_both_accepted(authorization: str) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine, api_tokens=TOKENS)) as client:
            await engine.wait_settled()
            response = await post(client, GOOD, headers={"authorization": authorization})
        assert response.status_code == 200, response.text
        assert engine.items_scored == 1

    run(body())


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics"])
def test_health_and_metrics_are_public(path: str) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine, api_tokens=TOKENS)) as client:
            await engine.wait_settled()
            response = await client.get(path)
        assert response.status_code == 200, response.text

    run(body())


# --- readiness, failures, shutdown -----------------------------------------------------------


def test_not_ready_while_loading_then_ready() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        engine = FakeEngine(load_gate=gate)
        async with serve(make_app(engine)) as client:
            await until(lambda: engine.starts == 1)
            response = await client.get("/readyz")
            error = assert_envelope(response, 503, "not_ready")
            assert error["message"] == "model is loading"
            response = await post(client, GOOD)
            error = assert_envelope(response, 503, "not_ready")
            assert "loading" in error["message"]
            assert response.headers["retry-after"] == "5"
            assert engine.calls == []
            assert (await client.get("/livez")).json() == {"status": "alive"}

            gate.set()
            await engine.wait_settled()
            response = await client.get("/readyz")
            assert response.status_code == 200, response.text
            assert response.json() == {
                "status": "ready",
                "model": {"name": FAKE_NAME, "version": FAKE_VERSION},
                "models": {FAKE_NAME: FAKE_VERSION},
            }
            await assert_good_request_succeeds(client)

    run(body())


def test_failed_load_is_reported_and_fatal() -> None:
    reason = "no weights in /models/fake-rm"

    async def body() -> None:
        fatal: list[BaseException] = []
        engine = FakeEngine(fail_load=reason)
        async with serve(make_app(engine, on_fatal=fatal.append)) as client:
            await engine.wait_settled()
            error = assert_envelope(await client.get("/readyz"), 503, "not_ready")
            assert error["message"] == f"model load failed: {reason}"
            response = await post(client, GOOD)
            error = assert_envelope(response, 503, "not_ready")
            assert reason in error["message"]
            assert "retry-after" in response.headers
            assert (await client.get("/livez")).status_code == 200
            metrics = (await client.get("/metrics")).text
        assert [str(exc) for exc in fatal] == [reason]
        assert engine.calls == []
        assert metric(metrics, "crs_model_info") is None

    run(body())


def test_unexpected_engine_error_is_a_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    secret = "CUDA error: device-side assert at /opt/crs/secret_module.py:42"

    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            engine.fail_next_score(RuntimeError(secret))
            response = await post(client, GOOD)
            error = assert_envelope(response, 500, "internal")
            assert error["details"] is None
            for leak in ("Traceback", "RuntimeError", "CUDA", "secret_module", ".py", "line "):
                assert leak not in response.text
            await assert_good_request_succeeds(client)

    run(body())
    # The traceback goes to the log instead.
    logged = [r for r in caplog.records if r.name == "crs.api" and r.exc_info is not None]
    assert [str(r.exc_info[1]) for r in logged if r.exc_info] == [secret]


def test_requests_in_flight_do_not_block_health() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        engine = FakeEngine(score_gate=gate)
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            pending = asyncio.create_task(post(client, GOOD))
            await until(lambda: len(engine.calls) == 1)
            assert (await client.get("/livez")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            # The held POST and this GET itself.
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "crs_requests_in_flight") == 2.0
            assert not pending.done()
            gate.set()
            response = await pending
            assert response.status_code == 200, response.text
            metrics = (await client.get("/metrics")).text
            assert metric(metrics, "crs_requests_in_flight") == 1.0

    run(body())


@pytest.mark.parametrize("loaded", [True, False], ids=["ready", "still-loading"])
def test_shutdown_stops_the_engine(loaded: bool) -> None:
    async def body() -> None:
        engine = FakeEngine(load_gate=None if loaded else asyncio.Event())
        async with serve(make_app(engine)):
            await until(lambda: engine.starts == 1)
            if loaded:
                await engine.wait_settled()
            assert engine.state == ("ready" if loaded else "loading")
        final_state: str = engine.state  # not narrowed by the assertion inside the block
        assert (engine.stops, final_state) == (1, "stopped")

    run(body())


# --- metrics and OpenAPI ----------------------------------------------------------------------


def test_metrics_count_routes_items_and_model() -> None:
    async def body() -> None:
        engine = FakeEngine()
        app = make_app(engine)

        @app.get("/v1/things/{thing_id}")
        async def thing(thing_id: str) -> dict[str, str]:
            return {"thing": thing_id}

        async with serve(app) as client:
            await engine.wait_settled()
            before = (await client.get("/metrics")).text
            three = [{"prompt": "p", "response": "a b"}] * 3
            two = [{"prompt": [{"role": "user", "content": "q"}], "response": "c"}] * 2
            for items in (three, two):
                assert (await post(client, {"items": items})).status_code == 200
            assert (await post(client, {"items": "nope"})).status_code == 422
            for thing_id in ("4242", "4343"):
                assert (await client.get(f"/v1/things/{thing_id}")).status_code == 200
            assert (await client.get("/no/such/path-9876")).status_code == 404
            after = (await client.get("/metrics")).text

        assert metric(before, "crs_items_scored_total") == 0.0
        assert metric(after, "crs_items_scored_total") == 5.0
        assert metric(after, "crs_tokens_scored_total") == 3 * 5 + 2 * 4
        assert metric(after, "crs_items_truncated_total") == 0.0

        def requests(route: str, method: str, status: str) -> float | None:
            labels = {"route": route, "method": method, "status": status}
            return metric(after, "crs_requests_total", labels)

        assert requests("/v1/rewards", "POST", "200") == 2.0
        assert requests("/v1/rewards", "POST", "422") == 1.0
        assert requests("/v1/things/{thing_id}", "GET", "200") == 2.0
        assert requests("unmatched", "GET", "404") == 1.0
        assert requests("/metrics", "GET", "200") == 1.0
        label_values = {
            value
            for family in text_string_to_metric_families(after)
            for sample in family.samples
            for value in sample.labels.values()
        }
        for raw in ("4242", "4343", "path-9876"):
            assert not any(raw in value for value in label_values)
        assert f'crs_model_info{{name="{FAKE_NAME}",version="{FAKE_VERSION}"}} 1.0' in after

    run(body())


def test_openapi_documents_the_rewards_body() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            response = await client.get("/openapi.json")
        assert response.status_code == 200, response.text
        spec = response.json()
        schemas = spec["components"]["schemas"]
        assert {"RewardsRequest", "RewardItem", "ChatMessage", "ContrastiveOptions"} <= set(schemas)
        request_schema = schemas["RewardsRequest"]
        assert set(request_schema["properties"]) == {
            "items",
            "model",
            "model_version",
            "contrastive",
            "truncation",
        }
        assert request_schema["required"] == ["items"]
        assert request_schema["additionalProperties"] is False
        request_body = spec["paths"]["/v1/rewards"]["post"]["requestBody"]
        assert request_body["required"] is True
        assert request_body["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/RewardsRequest"
        }
        # Every reference resolves to a listed schema.
        refs = set(_refs(spec))
        assert refs
        assert {ref.removeprefix("#/components/schemas/") for ref in refs} <= set(schemas)

    run(body())


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_non_finite_reward_is_a_500_naming_the_items() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            engine.fail_next_score(NonFiniteReward([1]))
            response = await post(client, {"items": GOOD["items"] * 2})
            error = assert_envelope(response, 500, "internal")
            assert "non-finite reward for item(s) [1]" in error["message"]
            assert error["details"] == {"items": [1]}
            await assert_good_request_succeeds(client)

    run(body())


def test_client_gone_while_sending_its_body_is_a_499_not_a_500() -> None:
    """The client hangs up after part of the body: no 500, no traceback, nothing scored."""
    messages = [
        {"type": "http.request", "body": b'{"items": [', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def body() -> None:
        engine = FakeEngine()
        app = make_app(engine)
        async with serve(app):
            await engine.wait_settled()
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/rewards",
                "raw_path": b"/v1/rewards",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"content-type", b"application/json")],
                "client": ("127.0.0.1", 1),
                "server": ("test", 80),
            }
            await app(scope, receive, send)
        assert sent[0]["status"] == 499
        assert json.loads(sent[1]["body"])["error"]["type"] == "client_closed"
        assert engine.calls == []

    run(body())
