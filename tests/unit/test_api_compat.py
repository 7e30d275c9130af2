"""``POST /get_reward`` in process with the fake engine: settings, auth, the rendering rule of
baselines, the item limit, text that is not Unicode, and a baseline store that is down."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.compat import end_marker, rendering_version
from service.scoring.types import RewardInput, Score
from service.settings import Settings, Truncation
from tests.unit.fake_engine import FAKE_VERSION, FakeEngine, LiveApp, fake_reward, serve
from tests.unit.test_api import assert_envelope, make_app, run, sha256_id
from tests.unit.test_api_baselines import FailingStore, with_store

PROMPT = "<|user|>Q<|assistant|>"
BASELINE = ["a", "bbbb", "cc</s>"]


class EncodingEngine(FakeEngine):
    """The fake, but it encodes every text to UTF-8 first, as a real tokenizer does (and fails
    as one does on text that is not Unicode)."""

    async def score(self, items: Sequence[RewardInput], *, truncation: Truncation) -> list[Score]:
        for item in items:
            (item.text or f"{item.prompt}{item.response}").encode("utf-8")
        return await super().score(items, truncation=truncation)


def texts(engine: FakeEngine) -> list[str | None]:
    return [item.text for call in engine.calls for item in call.items]


@pytest.mark.parametrize(("on_missing", "expected"), [("raw", 0.3), ("zero", 0.0)])
def test_a_prompt_without_baseline_gets_what_the_setting_says(
    on_missing: str, expected: float
) -> None:
    async def body() -> None:
        app = make_app(FakeEngine(), get_reward_on_missing=on_missing)
        async with serve(app) as client:
            response = await client.post(
                "/get_reward", json={"query": ["P:abc"], "prompts": ["P:"]}
            )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["scores"] == [pytest.approx(0.3)]  # the fake: len("abc") / 10
        assert answer["rewards"] == [pytest.approx(expected)]
        assert answer["extra_logs"]["baseline_missing"] == [1.0]

    run(body())


def test_get_reward_needs_the_api_token_when_one_is_set() -> None:
    async def body() -> None:
        app = make_app(FakeEngine(), api_tokens="tok-aaaaaaaa")
        async with serve(app) as client:
            refused = await client.post("/get_reward", json={"query": []})
            assert_envelope(refused, 401, "unauthorized")
            headers = {"Authorization": "Bearer tok-aaaaaaaa"}
            allowed = await client.post("/get_reward", json={"query": []}, headers=headers)
        assert allowed.status_code == 200, allowed.text

    run(body())


# --- one rendering rule for both terms --------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "marker"),
    [
        ("P:abc</s>", "</s>"),
        ("P:abc<|im_end|>", "<|im_end|>"),
        ("P:abc<|im_end|>\n", "<|im_end|>\n"),
        ("P:abc", ""),  # cut at the length limit: no end token
        ("P:abc</s", ""),
    ],
)
def test_the_end_marker_is_the_known_end_text_the_query_ends_with(query: str, marker: str) -> None:
    assert end_marker(query, ["</s>", "<|im_end|>", "<|eot_id|>"]) == marker


def test_baseline_responses_are_rendered_as_the_queries_and_cached_apart() -> None:
    async def body() -> None:
        engine = FakeEngine()
        app = make_app(engine)
        async with serve(app) as client:
            put = {"items": [{"prompt": PROMPT, "responses": BASELINE}]}
            assert (await client.put("/v1/baselines", json=put)).status_code == 200
            engine.calls.clear()
            query = f"{PROMPT}Sure.</s>"
            response = await client.post(
                "/get_reward", json={"query": [query], "prompts": [PROMPT]}
            )
            assert response.status_code == 200, response.text
            summary = (await client.get("/v1/baselines")).json()
            store = app.state.services.baselines.store
            pid = sha256_id(PROMPT)
            rendered = await store.lookup([pid], rendering_version(FAKE_VERSION, "</s>"))
            template = await store.lookup([pid], FAKE_VERSION)
        # The query as sent; each baseline response as a query would be, the marker once.
        assert texts(engine) == [query] + [f"{PROMPT}{r}" for r in ["a</s>", "bbbb</s>", "cc</s>"]]
        answer = response.json()
        assert answer["extra_logs"]["baseline_computed"] == [1.0]
        baseline = sum(fake_reward(PROMPT, r) for r in BASELINE) / len(BASELINE)
        assert answer["rewards"] == [pytest.approx(fake_reward(PROMPT, "Sure.</s>") - baseline)]
        # Cached under the rendering's own version; the template's stays what /v1/baselines says.
        assert rendered[pid].rewards is not None
        assert template[pid].rewards is not None
        assert summary["model"]["version"] == FAKE_VERSION
        assert rendering_version(FAKE_VERSION, "</s>") != FAKE_VERSION

    run(body())


def test_a_second_request_finds_the_rendered_baseline_in_the_cache() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            put = {"items": [{"prompt": PROMPT, "responses": BASELINE}]}
            assert (await client.put("/v1/baselines", json=put)).status_code == 200
            request = {"query": [f"{PROMPT}x</s>", f"{PROMPT}y"], "prompts": [PROMPT, PROMPT]}
            first = (await client.post("/get_reward", json=request)).json()
            engine.calls.clear()
            second = (await client.post("/get_reward", json=request)).json()
        # Two markers ("</s>" and none): two renderings, each computed once, then cached.
        assert first["extra_logs"]["baseline_computed"] == [1.0, 1.0]
        assert second["extra_logs"]["baseline_cache"] == [1.0, 1.0]
        assert texts(engine) == request["query"]
        assert second["rewards"] == pytest.approx(first["rewards"])

    run(body())


def test_one_store_lookup_serves_every_prompt_of_a_batch() -> None:
    """A PPO batch holds many prompts with one end marker: one lookup, not one per prompt."""

    async def body() -> None:
        app = make_app(FakeEngine())
        store = app.state.services.baselines.store
        lookups: list[list[str]] = []
        lookup = store.lookup

        async def counted(prompt_ids: Sequence[str], *args: Any, **kwargs: Any) -> Any:
            lookups.append(list(prompt_ids))
            return await lookup(prompt_ids, *args, **kwargs)

        store.lookup = counted
        prompts = [f"{PROMPT} number {n}" for n in range(8)]
        async with serve(app) as client:
            put = {"items": [{"prompt": p, "responses": BASELINE} for p in prompts]}
            assert (await client.put("/v1/baselines", json=put)).status_code == 200
            lookups.clear()
            request = {"query": [f"{p}x</s>" for p in prompts], "prompts": prompts}
            answer = (await client.post("/get_reward", json=request)).json()
        assert answer["extra_logs"]["baseline_computed"] == [1.0] * len(prompts)
        assert len(lookups) == 1
        assert len(lookups[0]) == len(prompts)

    run(body())


# --- bounds and text that is not Unicode ------------------------------------------------------


def test_too_many_queries_413_before_the_engine() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine, max_items_per_request=2)) as client:
            response = await client.post("/get_reward", json={"query": ["a", "b", "c"]})
            error = assert_envelope(response, 413, "payload_too_large")
            allowed = await client.post("/get_reward", json={"query": ["a", "b"]})
        assert error["details"] == {"items": 3, "max_items_per_request": 2}
        assert engine.items_scored == 2  # only the second request reached the engine
        assert allowed.status_code == 200

    run(body())


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/get_reward", '{"query": ["\\ud800"]}', ["query", 0]),
        (
            "/get_reward",
            '{"query": ["ok", "a"], "prompts": ["x", "\\udfff"]}',
            ["prompts", 1],
        ),
        ("/v1/rewards", '{"items": [{"prompt": "p", "response": "\\ud800"}]}', None),
        ("/get_reward", '{"query": ["a"], "labels": [{"\\ud800": 1}]}', ["labels", 0]),
    ],
)
def test_a_lone_surrogate_is_a_422_naming_the_string(
    path: str, body: str, loc: list[Any] | None
) -> None:
    async def request() -> None:
        engine = EncodingEngine()
        async with serve(make_app(engine)) as client:
            headers = {"content-type": "application/json"}
            response = await client.post(path, content=body.encode(), headers=headers)
            error = assert_envelope(response, 422, "validation_error")
            good = await client.post("/get_reward", json={"query": ["P:abc\U0001f600"]})
        assert "surrogate" in error["message"]
        if loc is not None:
            assert error["details"][0]["loc"] == loc
        assert good.status_code == 200, good.text  # a surrogate *pair* is Unicode text
        assert engine.items_scored == 1

    run(request())


@pytest.fixture(scope="module")
def live() -> Iterator[LiveApp]:
    app = LiveApp(EncodingEngine(), Settings(max_items_per_request=8))
    yield app
    app.close()


# Any code point, lone surrogates included (JSON writes them as \ud800 escapes).
TEXT = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
GET_REWARD_BODY = st.fixed_dictionaries(
    {"query": st.lists(TEXT, max_size=10)},
    optional={
        "prompts": st.lists(TEXT, max_size=10),
        "labels": st.lists(JSON_VALUE, max_size=3),
        "on_unavailable": st.sampled_from(["null", "raw", "error", "other"]),
        "extra": JSON_VALUE,
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=GET_REWARD_BODY | JSON_VALUE)
def test_get_reward_never_answers_5xx(live: LiveApp, body: Any) -> None:
    response = live.post(json.dumps(body).encode(), "/get_reward")
    assert response.status_code in {200, 413, 422}, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"type", "message", "details"}
    else:
        assert len(response.json()["rewards"]) == len(body["query"])


# --- the baseline store is down ---------------------------------------------------------------


def down(engine: FakeEngine, **settings: Any) -> Any:
    return with_store(make_app(engine, store_cooldown_s=60, **settings), FailingStore())


@pytest.mark.parametrize(
    ("setting", "requested", "expected"),
    [
        (None, None, 0.0),  # the default: 0.0, the neutral contrastive reward
        ("raw", None, 0.3),
        ("raw", "null", 0.0),
        ("null", "raw", 0.3),
    ],
)
def test_get_reward_with_the_store_down_answers_what_on_unavailable_says(
    setting: str | None, requested: str | None, expected: float, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        extra = {} if setting is None else {"get_reward_on_unavailable": setting}
        # on_missing raw is the default: an outage must not be taken for a missing baseline.
        app = down(FakeEngine(), get_reward_on_missing="raw", **extra)
        request: dict[str, Any] = {"query": ["P:abc"], "prompts": ["P:"]}
        if requested is not None:
            request["on_unavailable"] = requested
        async with serve(app) as client:
            response = await client.post("/get_reward", json=request)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["scores"] == [pytest.approx(0.3)]
        assert answer["rewards"] == [pytest.approx(expected)]
        assert answer["extra_logs"]["baseline_unavailable"] == [1.0]
        assert answer["extra_logs"]["baseline"] == [0.0]

    with caplog.at_level("WARNING", logger="crs.api.compat"):
        run(body())
    assert any("unavailable for 1 of 1 queries" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", ["setting", "request"])
def test_get_reward_on_unavailable_error_is_a_503_listing_the_prompts(how: str) -> None:
    async def body() -> None:
        engine = FakeEngine()
        settings = {"get_reward_on_unavailable": "error"} if how == "setting" else {}
        request: dict[str, Any] = {"query": ["P:abc", "Q:d"], "prompts": ["P:", "Q:"]}
        if how == "request":
            request["on_unavailable"] = "error"
        async with serve(down(engine, **settings)) as client:
            response = await client.post("/get_reward", json=request)
        error = assert_envelope(response, 503, "store_unavailable")
        assert error["details"] == {
            "unavailable_prompt_ids": sorted([sha256_id("P:"), sha256_id("Q:")])
        }
        assert response.headers["retry-after"] == "60"  # the store's cool-down
        assert engine.items_scored == 0  # refused before scoring

    run(body())


@pytest.mark.parametrize(
    ("options", "contrastive"),
    [
        ({}, None),
        ({"on_missing": "raw"}, None),  # unavailable is not missing
        ({"on_unavailable": "null", "on_missing": "raw"}, None),
        ({"on_unavailable": "raw"}, 0.1),
    ],
)
def test_rewards_with_the_store_down_follow_on_unavailable(
    options: dict[str, str], contrastive: float | None
) -> None:
    async def body() -> None:
        async with serve(down(FakeEngine())) as client:
            request = {"items": [{"prompt": "P", "response": "x"}], "contrastive": options}
            response = await client.post("/v1/rewards", json=request)
        assert response.status_code == 200, response.text
        [result] = response.json()["results"]
        assert result["baseline_source"] == "unavailable"
        assert result["contrastive"] == (
            None if contrastive is None else pytest.approx(contrastive)
        )

    run(body())


def test_rewards_on_unavailable_error_is_a_503_listing_the_prompts() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(down(engine)) as client:
            items = [{"prompt": "P", "response": "x"}, {"prompt": "Q", "response": "y"}]
            request = {"items": items, "contrastive": {"on_unavailable": "error"}}
            response = await client.post("/v1/rewards", json=request)
        error = assert_envelope(response, 503, "store_unavailable")
        assert error["details"] == {
            "unavailable_prompt_ids": sorted([sha256_id("P"), sha256_id("Q")])
        }
        assert int(response.headers["retry-after"]) <= 60
        assert engine.items_scored == 0

    run(body())
