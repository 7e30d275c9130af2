"""The reward client's pure parts: replica rotation and cool-down, chunk spans, input checks,
the error envelope, the models listing, and what it refuses at construction. Its version
protocol against fake replicas is in tests/unit/test_client_versions.py; behaviour against a
real server in tests/e2e/test_client.py."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import pytest

from trainer_client.client.replicas import Replicas, replica_down
from trainer_client.client.retry import RetryPolicy
from trainer_client.client.reward_client import (
    AsyncRewardClient,
    RewardClient,
    RewardServiceError,
    _response_spans,
    _spans,
    _to_json,
    _unique_prompt_ids,
    _with_upload_ids,
)
from trainer_client.client.wire import BaselineItem, Item, ModelsInfo

A, B, C = "http://a:1", "http://b:2", "http://c:3"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_replicas_take_turns() -> None:
    replicas = Replicas([A, B + "/", C], cooldown_s=5.0)
    assert [replicas.pick() for _ in range(6)] == [A, B, C, A, B, C]


def test_a_replica_marked_down_is_skipped_until_its_cooldown_ends() -> None:
    clock = Clock()
    replicas = Replicas([A, B, C], cooldown_s=5.0, clock=clock)
    replicas.mark_down(B)
    assert [replicas.pick() for _ in range(4)] == [A, C, A, C]
    clock.now += 5.0
    assert [replicas.pick() for _ in range(3)] == [A, B, C]


def test_a_retry_avoids_the_replica_that_just_failed() -> None:
    replicas = Replicas([A, B], cooldown_s=5.0)
    assert replicas.pick() == A
    # B is next in turn anyway; after it, A would be next, but A just failed.
    assert replicas.pick() == B
    assert replicas.pick(avoid=A) == B


def test_when_every_replica_cools_down_the_one_back_soonest_is_picked() -> None:
    clock = Clock()
    replicas = Replicas([A, B, C], cooldown_s=5.0, clock=clock)
    replicas.mark_down(B)
    clock.now += 1
    replicas.mark_down(C)
    replicas.mark_down(A)
    assert replicas.pick() == B
    assert not replicas.other_available(A)
    clock.now += 4
    assert replicas.other_available(A)


def test_replicas_that_lack_the_pinned_version_are_never_picked() -> None:
    clock = Clock()
    replicas = Replicas([A, B, C], cooldown_s=5.0, clock=clock)
    assert [replicas.pick(skip={B}) for _ in range(4)] == [A, C, A, C]
    replicas.mark_down(C)
    # C cools down, B is skipped: A, even where it is the one to avoid.
    assert replicas.pick(avoid=A, skip={B}) == A
    assert not replicas.other_available(A, skip={B})
    with pytest.raises(ValueError, match="every replica is skipped"):
        replicas.pick(skip={A, B, C})


def test_a_zero_cooldown_never_skips() -> None:
    replicas = Replicas([A, B], cooldown_s=0.0)
    replicas.mark_down(A)
    assert [replicas.pick() for _ in range(2)] == [A, B]


@pytest.mark.parametrize(
    ("urls", "message"),
    [([], "at least one"), (["rm-0:8000"], "bad service URL"), ([A, A + "/"], "repeat")],
)
def test_bad_replica_lists_are_refused(urls: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Replicas(urls, cooldown_s=1.0)


@pytest.mark.parametrize(
    ("error", "down"),
    [
        (httpx.ConnectError("refused"), True),
        (httpx.ReadError("reset"), True),
        (httpx.RemoteProtocolError("dropped"), True),
        (httpx.ReadTimeout("slow"), False),
        (httpx.PoolTimeout("busy here"), False),
    ],
)
def test_which_transport_failures_mark_a_replica_down(
    error: httpx.TransportError, down: bool
) -> None:
    assert replica_down(error) is down


def test_spans_cover_everything_once_in_order() -> None:
    assert _spans(0, 4) == []
    assert _spans(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_response_spans_keep_prompts_whole() -> None:
    assert _response_spans([3, 3, 3, 3, 3], 7) == [(0, 2), (2, 4), (4, 5)]
    # A prompt over the limit travels alone rather than being split.
    assert _response_spans([2, 9, 1], 4) == [(0, 1), (1, 2), (2, 3)]
    assert _response_spans([], 4) == []


def test_items_are_checked_and_sent_without_nulls() -> None:
    chat = [{"role": "user", "content": "hi"}]
    items: list[Item | dict[str, str]] = [
        {"prompt": "p", "response": "r"},
        Item(prompt=chat, response="r"),
    ]
    bodies = _to_json(items, Item)
    assert bodies == [{"prompt": "p", "response": "r"}, {"prompt": chat, "response": "r"}]
    with pytest.raises(ValueError, match="item 1 is not a valid Item"):
        _to_json([{"prompt": "p", "response": "r"}, {"prompt": "p", "reponse": "typo"}], Item)


def test_a_prompt_pushed_twice_in_one_call_is_refused() -> None:
    bodies = _to_json(
        [
            BaselineItem(prompt="p", responses=["a"]),
            BaselineItem(prompt="q", responses=["b"], prompt_id="x"),
            BaselineItem(prompt="p", responses=["c"]),
        ],
        BaselineItem,
    )
    with pytest.raises(ValueError, match=r"given twice \(items 0 and 2\)"):
        _unique_prompt_ids(bodies)


def test_each_baseline_item_gets_an_upload_id_unless_it_has_one() -> None:
    bodies = _to_json(
        [
            BaselineItem(prompt="p", responses=["a"]),
            {"prompt": "q", "responses": ["b"], "upload_id": "mine"},
            BaselineItem(prompt="r", responses=["c"]),
        ],
        BaselineItem,
    )
    ids = [body["upload_id"] for body in _with_upload_ids(bodies)]
    assert ids[1] == "mine"
    assert len(set(ids)) == 3
    assert all(1 <= len(i) <= 128 and i.isascii() and i.isprintable() for i in ids)


def answer(status: int, **kwargs: object) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("POST", f"{A}/v1/rewards"), **kwargs)  # type: ignore[arg-type]


def test_the_error_envelope_is_read() -> None:
    body = {"error": {"type": "conflict", "message": "pinned", "details": {"active": "m@1"}}}
    error = RewardServiceError.from_response(answer(409, json=body), offset=64)
    assert (error.status, error.error_type, error.message) == (409, "conflict", "pinned")
    assert (error.details, error.offset, error.url) == ({"active": "m@1"}, 64, f"{A}/v1/rewards")
    assert str(error) == f"HTTP 409 conflict from {A}/v1/rewards: pinned"


def test_an_answer_outside_the_envelope_is_still_an_error() -> None:
    error = RewardServiceError.from_response(answer(502, text="<html>bad gateway</html>"))
    assert (error.status, error.error_type) == (502, "http_error")
    assert "bad gateway" in error.message


def test_models_take_the_active_version_as_a_string_or_an_object() -> None:
    entry = {"name": "m", "version": "m@1", "path": "/m", "state": "active"}
    for active in ("m@1", {"name": "m", "version": "m@1"}):
        info = ModelsInfo.model_validate({"active": active, "models": [entry]})
        assert info.active == "m@1"
        assert info.models[0].error is None


def test_models_read_every_name_and_rebaseline_progress_and_ignore_new_fields() -> None:
    entry = {
        "name": "rm",
        "version": "rm@abc",
        "path": "/m/rm",
        "state": "active",
        "error": None,
        "in_flight": 2,
        "loaded_at": 1.7e9,
        "activated_at": 1.7e9 + 5,
        "default": True,
        "rebaseline": {
            "state": "running",
            "prompts_total": 10,
            "prompts_done": 3,
            "responses_scored": 24,
            "prompts_cached_already": 1,
            "error": None,
            "eta_s": 4.0,
        },
        "someday": "a field this client does not know",
    }
    harm = {"name": "harm", "version": "harm@1", "state": "loading", "rebaseline": None}
    info = ModelsInfo.model_validate(
        {
            "active": {"name": "rm", "version": "rm@abc"},
            "default": "rm",
            "active_versions": {"rm": "rm@abc", "harm": None},
            "models": [entry, harm],
        }
    )
    assert (info.active, info.default, info.active_versions) == (
        "rm@abc",
        "rm",
        {"rm": "rm@abc", "harm": None},
    )
    rm, loading = info.models
    assert (rm.in_flight, rm.default, rm.activated_at) == (2, True, 1.7e9 + 5)
    assert rm.rebaseline is not None
    assert (rm.rebaseline.state, rm.rebaseline.prompts_done) == ("running", 3)
    assert (loading.rebaseline, loading.default, loading.in_flight) == (None, None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"model": ""}, "model must be"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AsyncRewardClient(A, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        RewardClient(A, **kwargs)  # type: ignore[arg-type]


def test_a_bad_replica_cooldown_is_refused() -> None:
    with pytest.raises(ValueError, match="replica_cooldown_s must be"):
        RetryPolicy(replica_cooldown_s=-1.0)


def test_a_closed_client_refuses_calls_and_closes_twice_quietly() -> None:
    client = RewardClient(A)
    assert client.urls == [A]
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.score([{"prompt": "p", "response": "r"}])


def test_empty_inputs_send_nothing() -> None:
    # Nothing listens on this replica: any request would fail.
    with RewardClient("http://127.0.0.1:9", retry=RetryPolicy(retries=0)) as client:
        assert client.score([]) == []
        pushed = client.push_baselines([])
    assert (pushed.model, pushed.stored, pushed.failed, pushed.results) == (None, 0, 0, [])


def test_importing_the_client_imports_neither_torch_nor_the_service() -> None:
    code = (
        "import sys\n"
        "import trainer_client\n"
        "assert 'httpx' not in sys.modules, 'the client is imported on first use only'\n"
        "from trainer_client import RewardClient, AsyncRewardClient, RewardResult\n"
        "import trainer_client.client.reward_client\n"
        "leaked = {'torch', 'service', 'transformers'} & set(sys.modules)\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
