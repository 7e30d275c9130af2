"""The TRL reward function and the verl compute_score against a real `crs-service serve`: the
rewards they give are those of a plain POST /v1/rewards, prompts of both shapes and prompt ids
go through, and failures give None (TRL) or raise (refusals no retry can cure; verl). With the
baseline store killed, each adapter does what its on_unavailable says (TRL: None by default,
verl: 0.0 by default), never the raw reward unasked, and warns how many."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fault_proxy import Fault, FaultProxy
from trainer_client import RetryPolicy, RewardClient, RewardServiceError
from trainer_client.adapters import verl
from trainer_client.adapters.trl import contrastive_reward_func
from trainer_client.launch import RedisProcess, ServiceProcess

TOLERANCE = 1e-4
FAST = RetryPolicy(retries=2, base_s=0.01, max_s=0.05)
NO_RETRY = RetryPolicy(retries=0)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
BASELINES: list[dict[str, Any]] = [
    {"prompt": "Write a haiku about rain.", "responses": ["Rain falls softly.", "Grey sky."]},
    {"prompt": CHAT, "responses": ["Paris.", "It is Paris.", "Lyon?"]},
    {"prompt": "Count to three.", "prompt_id": "count", "responses": ["1 2 3", "one two"]},
]
NO_BASELINE = "A prompt nobody sampled baselines for."


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_llama) as running:
        running.wait_ready()
        with RewardClient(running.url) as client:
            assert client.push_baselines(BASELINES).stored == len(BASELINES)
        yield running


@pytest.fixture(scope="module")
def outage(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service whose Redis held the baselines and was then killed."""
    with (
        RedisProcess(tmp_path_factory.mktemp("redis")) as dying,
        ServiceProcess(tiny_llama, env={"CRS_REDIS_URL": dying.url}) as running,
    ):
        running.wait_ready()
        with RewardClient(running.url) as client:
            assert client.push_baselines(BASELINES).stored == len(BASELINES)
        dying.kill()
        yield running


@pytest.fixture
def proxy(server: ServiceProcess) -> Iterator[FaultProxy]:
    with FaultProxy(server.url) as running:
        yield running


def direct(url: str, items: list[dict[str, Any]], on_missing: str = "null") -> list[dict[str, Any]]:
    """The results of one plain request, without any client."""
    body = {"items": items, "contrastive": {"on_missing": on_missing}}
    response = httpx.post(f"{url}/v1/rewards", json=body, timeout=60)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def contrastive(results: list[dict[str, Any]]) -> list[float | None]:
    return [result["contrastive"] for result in results]


# --- TRL -----------------------------------------------------------------------------------


def test_trl_string_prompts_and_prompt_ids(server: ServiceProcess) -> None:
    reward = contrastive_reward_func(server.url)
    prompts = ["Write a haiku about rain.", "Count to three.", "Count to three."]
    completions = ["Drops on the roof.", "1, 2, 3.", ""]
    rewards = asyncio.run(reward(prompts, completions, prompt_id=[None, "count", "count"]))
    expected = direct(
        server.url,
        [
            {"prompt": prompts[0], "response": completions[0]},
            {"prompt": prompts[1], "response": completions[1], "prompt_id": "count"},
            {"prompt": prompts[2], "response": "", "prompt_id": "count"},  # empty: as it is
        ],
    )
    assert [result["baseline_source"] for result in expected] == ["cache"] * 3
    assert rewards == pytest.approx(contrastive(expected), abs=TOLERANCE)


def test_trl_conversational_prompts_and_completions(server: ServiceProcess) -> None:
    reward = contrastive_reward_func(server.url)
    completions = [[{"role": "assistant", "content": text}] for text in ("Paris.", "Rome.")]
    rewards = asyncio.run(reward([CHAT, CHAT], completions))
    expected = direct(server.url, [{"prompt": CHAT, "response": t} for t in ("Paris.", "Rome.")])
    assert rewards == pytest.approx(contrastive(expected), abs=TOLERANCE)
    assert rewards[0] != pytest.approx(expected[0]["reward"], abs=TOLERANCE)  # a baseline applied


@pytest.mark.parametrize(
    ("options", "expected_key"),
    [
        ({"use": "raw"}, "reward"),
        ({"on_missing": "raw"}, "reward"),  # no baseline: the raw reward
        ({"on_missing": "null"}, None),  # no baseline: None, which TRL skips
    ],
    ids=["raw", "missing-raw", "missing-null"],
)
def test_trl_a_prompt_without_baseline(
    server: ServiceProcess, options: dict[str, Any], expected_key: str | None
) -> None:
    reward = contrastive_reward_func(server.url, **options)
    [value] = asyncio.run(reward([NO_BASELINE], ["Fine."]))
    [result] = direct(server.url, [{"prompt": NO_BASELINE, "response": "Fine."}])
    assert result["baseline_source"] == "missing"
    if expected_key is None:
        assert value is None
    else:
        assert value == pytest.approx(result[expected_key], abs=TOLERANCE)


OUTAGE_PROMPTS = ["Count to three.", "Write a haiku about rain.", "Count to three."]
OUTAGE_COMPLETIONS = ["1 2 3", "Drops.", "3 2 1"]


def raw_rewards_during(outage: ServiceProcess) -> list[float]:
    """The raw rewards of the outage completions, asked of the service directly."""
    items = [
        {"prompt": p, "response": c}
        for p, c in zip(OUTAGE_PROMPTS, OUTAGE_COMPLETIONS, strict=True)
    ]
    results = direct(outage.url, items)
    assert {result["baseline_source"] for result in results} == {"unavailable"}
    return [result["reward"] for result in results]


@pytest.mark.parametrize("on_unavailable", [None, "raw"], ids=["default", "raw"])
def test_trl_during_a_store_outage(
    outage: ServiceProcess, on_unavailable: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    options = {} if on_unavailable is None else {"on_unavailable": on_unavailable}
    # on_missing raw, the TRL default that used to turn an outage into raw rewards.
    reward = contrastive_reward_func(outage.url, on_missing="raw", **options)
    with caplog.at_level(logging.WARNING, logger="crs.adapters.trl"):
        rewards = asyncio.run(reward(OUTAGE_PROMPTS, OUTAGE_COMPLETIONS))
    if on_unavailable is None:
        assert rewards == [None, None, None]  # TRL leaves them out of the advantages
    else:
        assert rewards == pytest.approx(raw_rewards_during(outage), abs=TOLERANCE)
    assert "crs baseline store unavailable for 3 of 3 completions" in caplog.text


@pytest.mark.parametrize(
    ("on_unavailable", "expected"),
    [(None, "zero"), (-0.5, "given"), ("raw", "raw")],
    ids=["default", "number", "raw"],
)
def test_verl_during_a_store_outage(
    outage: ServiceProcess,
    on_unavailable: float | str | None,
    expected: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def score_all() -> list[dict[str, float]]:
        calls = [
            verl.compute_score(
                "crs",
                completion,
                None,
                {"prompt": prompt},
                url=outage.url,
                on_unavailable=on_unavailable,
            )
            for prompt, completion in zip(OUTAGE_PROMPTS, OUTAGE_COMPLETIONS, strict=True)
        ]
        try:
            return list(await asyncio.gather(*calls))  # a batch, as verl's reward loop does
        finally:
            await verl.aclose_clients()

    with caplog.at_level(logging.WARNING, logger="crs.adapters.verl"):
        scores = asyncio.run(score_all())
    raw = raw_rewards_during(outage)
    wanted = {"zero": [0.0] * 3, "given": [-0.5] * 3, "raw": raw}[expected]
    assert [s["score"] for s in scores] == pytest.approx(wanted, abs=TOLERANCE)
    assert [s["raw_reward"] for s in scores] == pytest.approx(raw, abs=TOLERANCE)
    assert all(math.isnan(s["baseline"]) for s in scores)
    counts = [
        int(record.getMessage().split(" for ")[1].split(" of ")[0])
        for record in caplog.records
        if record.name == "crs.adapters.verl"
    ]
    assert counts  # one warning per burst of concurrent calls, every response counted once
    assert sum(counts) == len(OUTAGE_PROMPTS)


def test_trl_gives_none_and_a_warning_when_the_service_keeps_failing(
    proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.always = Fault(503)
    reward = contrastive_reward_func(proxy.url, retry=FAST)
    with caplog.at_level(logging.WARNING, logger="crs.adapters.trl"):
        rewards = asyncio.run(reward(["Count to three."] * 2, ["1 2 3", "3 2 1"]))
    assert rewards == [None, None]
    assert len(proxy.paths("/v1/rewards")) == FAST.retries + 1
    assert "no crs rewards for 2 completions" in caplog.text


def test_trl_retries_then_scores(server: ServiceProcess, proxy: FaultProxy) -> None:
    proxy.inject(429, 1)
    reward = contrastive_reward_func(proxy.url, retry=FAST)
    rewards = asyncio.run(reward(["Count to three."], ["1 2 3"], prompt_id=["count"]))
    [expected] = direct(
        server.url, [{"prompt": "Count to three.", "response": "1 2 3", "prompt_id": "count"}]
    )
    assert rewards == pytest.approx([expected["contrastive"]], abs=TOLERANCE)
    assert [seen.status for seen in proxy.paths("/v1/rewards")] == [429, 200]


def test_trl_raises_a_refusal_no_retry_can_cure(proxy: FaultProxy) -> None:
    proxy.always = Fault(401)
    reward = contrastive_reward_func(proxy.url, retry=FAST)
    with pytest.raises(RewardServiceError) as caught:
        asyncio.run(reward(["Count to three."], ["1 2 3"]))
    assert caught.value.status == 401


def test_trl_reuses_one_client_on_its_loop(server: ServiceProcess) -> None:
    clients_seen: list[tuple[str | None, str]] = []
    # The hook fires on each client's first answer: once per client made.
    reward = contrastive_reward_func(
        server.url, on_version_change=lambda old, new: clients_seen.append((old, new))
    )

    async def three_steps() -> None:
        for _ in range(3):
            await reward(["Count to three."], ["1 2 3"])

    asyncio.run(three_steps())
    assert len(clients_seen) == 1
    asyncio.run(three_steps())  # a new loop needs a client of its own
    assert len(clients_seen) == 2


# --- verl ----------------------------------------------------------------------------------


VERL_CASES: list[tuple[str, dict[str, Any]]] = [
    ("Rain on the window.", {"prompt": "Write a haiku about rain."}),
    ("Paris.", {"prompt": CHAT, "index": 7}),
    ("1 2 3", {"prompt": "Count to three.", "prompt_id": "count"}),
]


def verl_items(cases: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [
        {"prompt": info["prompt"], "response": solution}
        | ({"prompt_id": info["prompt_id"]} if "prompt_id" in info else {})
        for solution, info in cases
    ]


def test_verl_compute_score_is_the_contrastive_reward(server: ServiceProcess) -> None:
    async def score_all() -> list[dict[str, float]]:
        try:
            return [
                await verl.compute_score("crs", solution, None, info, url=server.url)
                for solution, info in VERL_CASES
            ]
        finally:
            await verl.aclose_clients()

    scores = asyncio.run(score_all())
    expected = direct(server.url, verl_items(VERL_CASES))
    assert [s["score"] for s in scores] == pytest.approx(contrastive(expected), abs=TOLERANCE)
    assert [s["raw_reward"] for s in scores] == pytest.approx(
        [r["reward"] for r in expected], abs=TOLERANCE
    )
    assert [s["baseline"] for s in scores] == pytest.approx(
        [r["baseline"] for r in expected], abs=TOLERANCE
    )


def test_verl_compute_score_reads_the_url_from_the_environment(
    server: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(verl.URL_ENV, server.url)

    async def score() -> dict[str, float]:
        try:
            return await verl.compute_score("crs", "Fine.", None, {"prompt": NO_BASELINE})
        finally:
            await verl.aclose_clients()

    result = asyncio.run(score())
    [expected] = direct(server.url, [{"prompt": NO_BASELINE, "response": "Fine."}])
    # No baseline: on_missing raw, so the score is the raw reward and the baseline NaN.
    assert result["score"] == pytest.approx(expected["reward"], abs=TOLERANCE)
    assert result["raw_reward"] == result["score"]
    assert math.isnan(result["baseline"])


def test_verl_compute_score_sync_matches(server: ServiceProcess) -> None:
    try:
        scores = [
            verl.compute_score_sync("crs", solution, None, info, url=server.url, use=use)
            for solution, info in VERL_CASES
            for use in ("contrastive", "raw")
        ]
    finally:
        verl.close_sync_clients()
    expected = direct(server.url, verl_items(VERL_CASES))
    pairs = [(r["contrastive"], r["reward"]) for r in expected]
    assert [s["score"] for s in scores] == pytest.approx(
        [value for pair in pairs for value in pair], abs=TOLERANCE
    )


def test_verl_raises_a_refusal(proxy: FaultProxy) -> None:
    proxy.always = Fault(401)

    async def score() -> dict[str, float]:
        try:
            return await verl.compute_score("crs", "x", None, {"prompt": "p"}, url=proxy.url)
        finally:
            await verl.aclose_clients()

    with pytest.raises(RewardServiceError) as caught:
        asyncio.run(score())
    assert caught.value.status == 401
