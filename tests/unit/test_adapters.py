"""The trainer adapters' pure parts: prompt and completion shapes, options refused when the
adapter is built, the client per event loop, and None (not an exception) when no service
answers. Scoring against a real server is in tests/e2e/test_adapters.py and test_trl.py."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import math
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer_client import AsyncRewardClient, RetryPolicy, RewardResult
from trainer_client.adapters import verl
from trainer_client.adapters.common import (
    LoopClients,
    as_prompt,
    contrastive_options,
    text_of,
)
from trainer_client.adapters.trl import (
    completion_text,
    contrastive_reward_func,
    log_baseline_coverage,
    log_unavailable,
    reward_of,
    to_items,
)
from trainer_client.launch import free_port

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]


def result(**fields: Any) -> RewardResult:
    base = {"reward": 1.5, "tokens": 9, "truncated": False, "model_version": "tiny@abc"}
    return RewardResult.model_validate(base | fields)


# --- shapes --------------------------------------------------------------------------------


def test_string_prompts_and_completions_go_as_they_are() -> None:
    items = to_items(["Hi?", "Yo?"], ["Hello.", "Hey."], ["a", None])
    assert [item.to_json() for item in items] == [
        {"prompt": "Hi?", "response": "Hello.", "prompt_id": "a"},
        {"prompt": "Yo?", "response": "Hey."},
    ]


def test_conversational_prompts_and_completions() -> None:
    completion = [{"role": "assistant", "content": "4"}]
    [item] = to_items([CHAT], [completion])
    assert item.prompt == CHAT
    assert item.response == "4"


def test_only_role_and_content_of_a_message_are_sent() -> None:
    prompt = [{"role": "user", "content": "Hi", "name": "bob", "tool_calls": None}]
    assert as_prompt(prompt) == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("plain", "plain"),
        (None, ""),
        ([{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}], "ab"),
    ],
    ids=["string", "none", "parts"],
)
def test_message_content_as_text(content: Any, text: str) -> None:
    assert text_of(content) == text


@pytest.mark.parametrize(
    ("completion", "text"),
    [
        ("plain", "plain"),
        ([{"role": "assistant", "content": "only"}], "only"),
        (
            [{"role": "assistant", "content": "call"}, {"role": "assistant", "content": "end"}],
            "end",
        ),
        ([], ""),
    ],
    ids=["string", "one-message", "last-message", "no-message"],
)
def test_completion_text(completion: Any, text: str) -> None:
    assert completion_text(completion) == text


def test_an_empty_completion_is_sent_as_it_is() -> None:
    [item] = to_items(["Hi?"], [""])
    assert item.response == ""


@pytest.mark.parametrize(
    ("prompts", "completions", "ids"),
    [(["a", "b"], ["x"], None), (["a"], ["x"], ["1", "2"])],
    ids=["completions", "prompt-ids"],
)
def test_mismatched_lengths_are_refused(
    prompts: list[str], completions: list[str], ids: list[str] | None
) -> None:
    with pytest.raises(ValueError, match="for"):
        to_items(prompts, completions, ids)


# --- the TRL reward function -----------------------------------------------------------------


def test_the_reward_function_is_a_named_coroutine_function() -> None:
    assert contrastive_reward_func("http://rm:8000").__name__ == "crs_contrastive"
    assert contrastive_reward_func("http://rm:8000", use="raw").__name__ == "crs_raw"
    named = contrastive_reward_func("http://rm:8000", name="helpfulness")
    assert named.__name__ == "helpfulness"
    # TRL runs a coroutine function on its own event loop rather than calling it inline.
    assert inspect.iscoroutinefunction(named)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use": "both"}, "use must be"),
        ({"normalize": "z"}, "normalize must be"),
        ({"on_missing": "skip"}, "on_missing must be"),
        ({"on_unavailable": "skip"}, "on_unavailable must be"),
    ],
    ids=["use", "normalize", "on_missing", "on_unavailable"],
)
def test_unknown_options_are_refused_at_once(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        contrastive_reward_func("http://rm:8000", **options)


def test_a_misspelt_client_option_is_refused_at_once() -> None:
    with pytest.raises(TypeError, match="chunksize"):
        contrastive_reward_func("http://rm:8000", chunksize=8)


def test_url_or_client_not_both() -> None:
    async def both() -> None:
        async with AsyncRewardClient("http://rm:8000") as client:
            contrastive_reward_func("http://rm:8000", client=client)

    with pytest.raises(ValueError, match="either client or url"):
        asyncio.run(both())
    with pytest.raises(ValueError, match="url"):
        contrastive_reward_func()


def test_no_service_gives_none_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reward = contrastive_reward_func(url, retry=RetryPolicy(retries=0))
    with caplog.at_level(logging.WARNING, logger="crs.adapters.trl"):
        rewards = asyncio.run(reward(["Hi?", CHAT], ["Hello.", [{"content": "4"}]]))
    assert rewards == [None, None]
    assert "no crs rewards for 2 completions" in caplog.text
    assert "unreachable" in caplog.text


def test_a_given_client_is_used() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def score() -> list[float | None]:
        async with AsyncRewardClient(url, retry=RetryPolicy(retries=0)) as client:
            reward = contrastive_reward_func(client=client)
            return await reward(["Hi?"], ["Hello."])

    assert asyncio.run(score()) == [None]


def test_trl_sends_on_unavailable_and_counts_the_outage(caplog: pytest.LogCaptureFixture) -> None:
    assert contrastive_options("contrastive", "mean", "none", "raw", "null") == {
        "aggregate": "mean",
        "normalize": "none",
        "on_missing": "raw",
        "on_unavailable": "null",
    }
    outage = result(baseline_source="unavailable")
    with caplog.at_level(logging.WARNING, logger="crs.adapters.trl"):
        log_unavailable([outage, result(baseline=0.5, contrastive=1.0), outage], "null")
        log_unavailable([result(baseline=0.5, contrastive=1.0)], "null")
    assert [record.getMessage() for record in caplog.records] == [
        "crs baseline store unavailable for 2 of 3 completions: rewarded None (skipped by TRL)"
    ]
    assert reward_of(outage, "contrastive") is None


def test_the_share_of_prompts_with_a_baseline_is_logged() -> None:
    logged: list[tuple[str, float]] = []
    found, missing = result(baseline=0.5, contrastive=1.0), result(baseline_source="missing")
    log_baseline_coverage(lambda *metric: logged.append(metric), "crs", [found, missing, found])
    log_baseline_coverage(None, "crs", [found])  # a TRL without log_metric
    assert logged == [("crs/baseline_found", pytest.approx(2 / 3))]


# --- one client per event loop -----------------------------------------------------------------


def test_loop_clients_are_made_once_per_loop_and_key() -> None:
    clients = LoopClients()
    made: list[AsyncRewardClient] = []

    def make() -> AsyncRewardClient:
        made.append(AsyncRewardClient("http://rm:8000"))
        return made[-1]

    async def on_one_loop() -> list[AsyncRewardClient]:
        try:
            return [clients.get("a", make), clients.get("a", make), clients.get("b", make)]
        finally:
            await clients.aclose()

    first = asyncio.run(on_one_loop())
    second = asyncio.run(on_one_loop())
    assert first[0] is first[1] is not first[2]
    assert not set(map(id, first)) & set(map(id, second))
    assert len(made) == 4


# --- verl ------------------------------------------------------------------------------------


def test_verl_options_from_kwargs_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(verl.URL_ENV, "http://rm-0:8000, http://rm-1:8000")
    monkeypatch.setenv(verl.TOKEN_ENV, "secret")
    options = verl.VerlOptions.from_kwargs({"reward_router_address": None, "aggregate": "median"})
    assert options.urls == ("http://rm-0:8000", "http://rm-1:8000")
    assert options.token == "secret"
    assert options.contrastive == {
        "aggregate": "median",
        "normalize": "none",
        "on_missing": "raw",
        "on_unavailable": "null",  # the number (0.0) is filled in by the adapter
    }
    given = verl.VerlOptions.from_kwargs(
        {"url": ["http://rm-2:8000"], "use": "raw", "max_concurrency": 4}
    )
    assert given.urls == ("http://rm-2:8000",)
    assert given.contrastive is None
    assert given.client_args == {
        "urls": ["http://rm-2:8000"],
        "token": "secret",
        "max_concurrency": 4,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "CRS_URL"),
        ({"url": "http://rm:8000", "on_missing": "null"}, "on_missing must be"),
        ({"url": "http://rm:8000", "truncation": "right"}, "truncation must be"),
        ({"url": "http://rm:8000", "on_unavailable": "null"}, "on_unavailable must be"),
        ({"url": "http://rm:8000", "on_unavailable": True}, "on_unavailable must be"),
        ({"url": "http://rm:8000", "on_unavailable": "nan"}, "finite"),
        ({"url": "http://rm:8000", "on_unavailable": float("inf")}, "finite"),
    ],
    ids=["no-url", "on-missing-null", "truncation", "unavailable-null", "bool", "nan", "inf"],
)
def test_verl_options_refused(
    kwargs: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(verl.URL_ENV, raising=False)
    with pytest.raises(ValueError, match=message):
        verl.VerlOptions.from_kwargs(kwargs)


def test_verl_reads_the_prompt_and_prompt_id_from_extra_info() -> None:
    item = verl.item_of("4", {"prompt": CHAT, "prompt_id": 17, "index": 3})
    assert item.to_json() == {"prompt": CHAT, "response": "4", "prompt_id": "17"}


@pytest.mark.parametrize("extra_info", [None, {}, {"question": "2 + 2?"}])
def test_verl_without_a_prompt_says_where_to_put_it(extra_info: dict[str, Any] | None) -> None:
    with pytest.raises(ValueError, match=r'extra_info\["prompt"\]'):
        verl.item_of("4", extra_info)


def verl_options(**kwargs: Any) -> verl.VerlOptions:
    return verl.VerlOptions.from_kwargs({"url": "http://rm:8000", **kwargs})


def test_verl_score_dict() -> None:
    scored = verl.score_of(result(baseline=0.5, contrastive=1.0), verl_options())
    assert scored == {"score": 1.0, "raw_reward": 1.5, "baseline": 0.5}
    raw = verl.score_of(result(), verl_options(use="raw"))
    assert raw["score"] == raw["raw_reward"] == 1.5
    assert math.isnan(raw["baseline"])


@pytest.mark.parametrize(
    ("given", "score", "wire"),
    [(None, 0.0, "null"), (-0.25, -0.25, "null"), ("1.5", 1.5, "null"), (2, 2.0, "null")],
    ids=["default", "number", "text", "int"],
)
def test_verl_scores_on_unavailable_where_the_store_failed(
    given: Any, score: float, wire: str
) -> None:
    options = verl_options(on_unavailable=given)
    assert options.contrastive is not None
    assert options.contrastive["on_unavailable"] == wire
    # What the service answers under on_unavailable null: a reward, no baseline, no contrastive.
    scored = verl.score_of(result(baseline_source="unavailable"), options)
    assert scored["score"] == score
    assert scored["raw_reward"] == 1.5
    assert math.isnan(scored["baseline"])


@pytest.mark.parametrize("choice", ["raw", "error"])
def test_verl_on_unavailable_raw_or_error_is_left_to_the_service(choice: str) -> None:
    options = verl_options(on_unavailable=choice)
    assert options.contrastive is not None
    assert options.contrastive["on_unavailable"] == choice


def test_verl_a_missing_contrastive_reward_that_is_no_outage_raises() -> None:
    with pytest.raises(ValueError, match="missing"):
        verl.score_of(result(baseline_source="missing"), verl_options())


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_verl_on_unavailable_takes_any_finite_number_or_its_text(number: float) -> None:
    assert verl.unavailable_score(number) == number
    assert verl.unavailable_score(repr(number)) == number


@given(st.text().filter(lambda text: text not in ("raw", "error")))
def test_verl_on_unavailable_refuses_other_text_with_a_value_error(text: str) -> None:
    try:
        number: float | None = float(text)
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        with pytest.raises(ValueError, match="on_unavailable"):
            verl.unavailable_score(text)
    else:
        assert verl.unavailable_score(text) == number


# --- the outage warning: once per burst of concurrent calls -----------------------------------


def fail_within(tally: verl.OutageTally) -> None:
    with tally.call(0.0) as failed:
        failed.unavailable = True
        raise RuntimeError("the request failed: it scored nothing")


def test_verl_outages_are_counted_in_one_warning_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tally = verl.OutageTally()
    with caplog.at_level(logging.WARNING, logger="crs.adapters.verl"):
        with tally.call(0.0) as first, tally.call(0.0), tally.call(0.0) as third:
            first.unavailable = third.unavailable = True
            assert caplog.records == []  # the burst is still running
        with pytest.raises(RuntimeError):
            fail_within(tally)
        with tally.call("raw") as alone:
            alone.unavailable = True
        with tally.call(0.0):
            pass  # a burst without an outage says nothing
    assert [record.getMessage() for record in caplog.records] == [
        "crs baseline store unavailable for 2 of 3 responses: scored 0.0 (on_unavailable)",
        "crs baseline store unavailable for 1 of 1 responses: scored their raw reward "
        "(on_unavailable: raw)",
    ]


# --- loading the file as verl does ------------------------------------------------------------


def test_verl_can_load_the_adapter_file_outside_sys_modules() -> None:
    """verl's ``load_module`` for a file path: executed under a name of its own, never put
    in ``sys.modules`` (so a module-level dataclass cannot look its module up there)."""
    spec = importlib.util.spec_from_file_location("custom_module_1", verl.__file__)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "custom_module_1" not in sys.modules
    assert inspect.iscoroutinefunction(module.compute_score)
    assert module.VerlOptions.from_kwargs({"url": "http://rm:8000"}).on_unavailable == 0.0
