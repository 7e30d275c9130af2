"""Property tests of POST /v1/rewards: no input makes it fail with a 5xx or without the envelope.

One app and one client serve every example: the app's lifespan runs in a task of a dedicated
event loop for the whole module, and each example is one request on that loop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.schemas import PROMPT_ID_MAX_CHARS, PROMPT_ID_PATTERN, check_prompt_id
from tests.unit.fake_engine import FAKE_VERSION, LiveApp, fake_reward, fake_tokens

ROLES = ["system", "user", "assistant", "tool"]
FIELDS = [
    "items",
    "prompt",
    "response",
    "prompt_id",
    "role",
    "content",
    "contrastive",
    "aggregate",
    "normalize",
    "on_missing",
    "model_version",
    "truncation",
]
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveApp]:
    app = LiveApp()
    yield app
    app.close()


def assert_no_server_error(response: httpx.Response) -> None:
    """Below 500, and the envelope whenever it is an error."""
    assert response.status_code < 500, response.text
    assert response.status_code in {200, 409, 413, 422}, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"type", "message", "details"}, body
        assert isinstance(body["error"]["type"], str)
        assert isinstance(body["error"]["message"], str)


def expected_result(item: dict[str, Any], contrastive: Any) -> dict[str, Any]:
    reward = fake_reward(item["prompt"], item["response"])
    raw = isinstance(contrastive, dict) and contrastive.get("on_missing") == "raw"
    return {
        "reward": pytest.approx(reward),
        "baseline": None,
        "contrastive": pytest.approx(reward) if raw else None,
        "baseline_n": 0,
        "baseline_source": None if contrastive is None else "missing",
        "tokens": fake_tokens(item["prompt"], item["response"]),
        "truncated": False,
    }


# --- strategies -------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


def is_prompt_id(value: str) -> bool:
    try:
        check_prompt_id(value)
    except ValueError:
        return False
    return True


valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=30)}),
    min_size=1,
    max_size=4,
)
valid_prompts = st.text(min_size=1, max_size=40) | valid_messages
valid_items = st.fixed_dictionaries(
    {"prompt": valid_prompts, "response": st.text(min_size=1, max_size=40)},
    optional={"prompt_id": st.text(min_size=1, max_size=20).filter(is_prompt_id)},
)
valid_options = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "aggregate": st.sampled_from(
            ["mean", "median", "min", "max", "quantile:0", "quantile:0.25", "quantile:1.0"]
        ),
        "normalize": st.sampled_from(["none", "std"]),
        "on_missing": st.sampled_from(["null", "raw"]),
    },
)
valid_requests = st.fixed_dictionaries(
    {"items": st.lists(valid_items, max_size=8)},
    optional={
        "contrastive": valid_options,
        "truncation": st.sampled_from(["none", "left"]),
        "model_version": st.just(FAKE_VERSION),
    },
)


def or_wrong(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a valid value, sometimes any JSON value in its place."""
    return valid | json_values


wrong_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": or_wrong(st.sampled_from([*ROLES, "wizard", "", "User"])),
            "content": or_wrong(st.text(max_size=10)),
        },
        optional={"name": json_values},
    ),
    max_size=3,
)
wrong_items = st.fixed_dictionaries(
    {
        "prompt": or_wrong(st.text(max_size=10) | wrong_messages),
        "response": or_wrong(st.text(max_size=10)),
    },
    optional={"prompt_id": or_wrong(st.text(max_size=10)), "score": json_values},
)
wrong_options = st.fixed_dictionaries(
    {},
    optional={
        "aggregate": or_wrong(
            st.sampled_from(["mean", "avg", "quantile:0.5", "quantile:2", "quantile:", "mean\n"])
            | st.text(max_size=12)
        ),
        "normalize": or_wrong(st.sampled_from(["none", "std", "zscore"])),
        "on_missing": or_wrong(st.sampled_from(["null", "raw", "error", "drop"])),
        "weight": json_values,
    },
)
wrong_requests = st.fixed_dictionaries(
    {"items": or_wrong(st.lists(wrong_items, max_size=5))},
    optional={
        "model_version": or_wrong(st.sampled_from([FAKE_VERSION, "other@1", ""])),
        "contrastive": or_wrong(st.none() | wrong_options),
        "truncation": or_wrong(st.sampled_from(["none", "left", "right", ""])),
        "temperature": json_values,
    },
)


# --- properties -------------------------------------------------------------------------------


@FUZZ
@given(value=json_values)
def test_any_json_value_gets_no_5xx(live: LiveApp, value: Any) -> None:
    assert_no_server_error(live.post(json.dumps(value).encode()))


@FUZZ
@given(content=st.binary(max_size=200))
def test_any_bytes_get_no_5xx(live: LiveApp, content: bytes) -> None:
    response = live.post(content)
    assert_no_server_error(response)


@FUZZ
@given(body=valid_requests, data=st.data())
def test_cut_valid_json_gets_no_5xx(
    live: LiveApp, body: dict[str, Any], data: st.DataObject
) -> None:
    content = json.dumps(body).encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(content) - 1), label="cut")
    response = live.post(content[:cut])
    assert_no_server_error(response)
    assert response.status_code == 422, response.text


@FUZZ
@given(body=wrong_requests)
def test_structured_but_wrong_requests_get_no_5xx(live: LiveApp, body: dict[str, Any]) -> None:
    response = live.post(json.dumps(body).encode())
    assert_no_server_error(response)
    if response.status_code == 200:
        # Whatever was accepted was a valid request after all: one result per item, in order.
        results = response.json()["results"]
        assert [r["reward"] for r in results] == [
            pytest.approx(fake_reward(i["prompt"], i["response"])) for i in body["items"]
        ]


@FUZZ
@given(body=valid_requests)
def test_valid_requests_get_one_result_per_item_in_order(
    live: LiveApp, body: dict[str, Any]
) -> None:
    response = live.post(json.dumps(body).encode())
    assert response.status_code == 200, response.text
    contrastive = body.get("contrastive", {})
    assert response.json()["results"] == [expected_result(i, contrastive) for i in body["items"]]
    if body["items"]:
        last = live.engine.calls[-1]
        assert [(i.prompt, i.response) for i in last.items] == [
            (i["prompt"], i["response"]) for i in body["items"]
        ]


# --- prompt ids: whatever PUT accepts, GET and DELETE can name ---------------------------------

# Text biased towards what breaks paths: separators, dots, escapes, line breaks and controls.
id_text = st.text(
    alphabet=st.sampled_from(list("ab/.%?#:{}* \\\n\r\t\x00\x7f\x85\u2028\u00e9\U0001f600"))
    | st.characters(codec="utf-8"),
    min_size=0,
    max_size=12,
)


def baseline_path(given: str, *, slashes_encoded: bool) -> str:
    # Clients may or may not percent-encode "/"; both must name the same prompt.
    return "/v1/baselines/" + quote(given, safe="" if slashes_encoded else "/")


@FUZZ
@given(given=id_text, slashes_encoded=st.booleans())
def test_every_prompt_id_put_accepts_can_be_read_and_deleted(
    live: LiveApp, given: str, slashes_encoded: bool
) -> None:
    item = {"prompt": "P", "prompt_id": given, "responses": ["a"]}
    put = live.request("PUT", "/v1/baselines", json_body={"items": [item]})
    assert put.status_code in {200, 422}, put.text
    if put.status_code == 422:
        # Refused up front, never stored, and refused on the path as well.
        assert put.json()["error"]["type"] == "validation_error"
        return
    path = baseline_path(given, slashes_encoded=slashes_encoded)
    record = live.request("GET", path)
    assert record.status_code == 200, record.text
    assert record.json()["prompt_id"] == given
    deleted = live.request("DELETE", path)
    assert deleted.json() == {"prompt_id": given, "deleted": True}, deleted.text
    assert live.request("GET", path).status_code == 404


@pytest.mark.parametrize(
    "given",
    [
        "a\nb",
        "line\r",
        "tab\there",
        "nul\x00",
        "\x85",
        "a\u2028b",
        ".",
        "..",
        "a/../b",
        "x/.",
        "x" * (PROMPT_ID_MAX_CHARS + 1),
        "x" * 100_000,
        "",
        "\ud800",
    ],
)
def test_a_prompt_id_no_path_can_name_is_refused_before_it_is_stored(
    live: LiveApp, given: str
) -> None:
    item = {"prompt": "P", "prompt_id": given, "responses": ["a"]}
    put = live.request("PUT", "/v1/baselines", json_body={"items": [item]})
    assert put.status_code == 422, put.text
    rewards = live.request(
        "POST",
        "/v1/rewards",
        json_body={"items": [{"prompt": "P", "prompt_id": given, "response": "r"}]},
    )
    assert rewards.status_code == 422, rewards.text


@pytest.mark.parametrize(
    "given", ["sha256:" + "0" * 64, "with/slash", "a?b#c", "ünï code", "...", ".hidden", "x" * 512]
)
def test_prompt_ids_up_to_the_bound_work_on_every_route(live: LiveApp, given: str) -> None:
    item = {"prompt": "P", "prompt_id": given, "responses": ["a"]}
    assert live.request("PUT", "/v1/baselines", json_body={"items": [item]}).status_code == 200
    path = baseline_path(given, slashes_encoded=True)
    assert live.request("GET", path).json()["prompt_id"] == given
    assert live.request("DELETE", path).status_code == 200


@FUZZ
@given(given=id_text)
def test_the_documented_pattern_is_the_rule(given: str) -> None:
    # The OpenAPI pattern (with minLength 1) accepts exactly what the service accepts.
    try:
        check_prompt_id(given)
    except ValueError:
        valid = False
    else:
        valid = bool(given)
    assert valid == (bool(given) and re.fullmatch(PROMPT_ID_PATTERN, given) is not None)
