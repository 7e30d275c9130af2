"""``POST /get_reward`` answers the request shapes OpenRLHF sends, from a real server: raw
rewards equal a direct forward of the formatted query, and prompts with baselines get
contrastive rewards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.models import DirectScorer
from trainer_client.launch import ServiceProcess

TOLERANCE = 1e-4
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?"]
ANSWERS = ["Paris.", "Seven is prime.", "Sunlight scatters off air molecules."]
BASELINE = ["Paris, I think.", "It is Paris.", "Lyon?"]
SOURCES = ["cache", "computed", "missing", "unavailable"]


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[tuple[ServiceProcess, list[str], list[str]]]:
    """A server with a baseline for the first question only, pushed the way the OpenRLHF docs
    say: the prompt formatted as the policy (here the reward model's template) renders it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
    ]
    queries = [
        tokenizer.apply_chat_template([*c, {"role": "assistant", "content": a}], tokenize=False)
        for c, a in zip(chats, ANSWERS, strict=True)
    ]
    with ServiceProcess(tiny_llama) as server:
        server.wait_ready()
        item = {"prompt": prompts[0], "responses": BASELINE}
        pushed = httpx.put(f"{server.url}/v1/baselines", json={"items": [item]}, timeout=60)
        assert pushed.status_code == 200, pushed.text
        yield server, prompts, queries


def get_reward(server: ServiceProcess, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/get_reward", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


@pytest.fixture(scope="module")
def direct(tiny_llama: Path) -> tuple[list[float], float]:
    """Raw rewards of the three answers and the first question's baseline mean, computed with
    a plain per-item forward. The queries use the reward model's own template, which ends each
    turn with "</s>\n": a baseline response rendered as such a query (prompt, response, end
    marker) is that template's rendering too."""
    scorer = DirectScorer(tiny_llama)
    raw = [scorer.reward(q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    return raw, float(np.mean([scorer.reward(QUESTIONS[0], r) for r in BASELINE]))


@pytest.mark.parametrize("labels", [None, ["a", "b", "c"]], ids=["no-labels", "labels"])
def test_a_batch_gets_contrastive_rewards_where_baselines_exist(
    served: tuple[ServiceProcess, list[str], list[str]],
    direct: tuple[list[float], float],
    labels: list[str] | None,
) -> None:
    server, prompts, queries = served
    body: dict[str, Any] = {"query": queries, "prompts": prompts}
    if labels is not None:
        body["labels"] = labels
    answer = get_reward(server, body)
    raw, baseline = direct
    assert answer["scores"] == pytest.approx(raw, abs=TOLERANCE)
    expected = [raw[0] - baseline, raw[1], raw[2]]  # no baseline: the raw reward
    assert answer["rewards"] == pytest.approx(expected, abs=TOLERANCE)
    logs = answer["extra_logs"]
    assert logs["raw_reward"] == pytest.approx(raw, abs=TOLERANCE)
    assert logs["baseline"] == pytest.approx([baseline, 0.0, 0.0], abs=TOLERANCE)
    found = [c + d for c, d in zip(logs["baseline_cache"], logs["baseline_computed"], strict=True)]
    assert found == [1.0, 0.0, 0.0]  # computed the first time under the query rendering
    assert logs["baseline_missing"] == [0.0, 1.0, 1.0]
    # OpenRLHF turns every extra_logs list into a tensor: numbers only, one per query.
    for values in logs.values():
        assert len(values) == 3
        assert all(isinstance(v, float) for v in values)


def test_a_single_sample_as_openrlhf_sends_it(
    served: tuple[ServiceProcess, list[str], list[str]], direct: tuple[list[float], float]
) -> None:
    server, prompts, queries = served
    answer = get_reward(server, {"query": [queries[1]], "prompts": [prompts[1]], "labels": [""]})
    assert answer["rewards"] == pytest.approx([direct[0][1]], abs=TOLERANCE)
    assert {key: len(values) for key, values in answer["extra_logs"].items()} == {
        "raw_reward": 1,
        "baseline": 1,
        **{f"baseline_{source}": 1 for source in SOURCES},
    }


def test_queries_without_prompts_get_raw_rewards(
    served: tuple[ServiceProcess, list[str], list[str]], direct: tuple[list[float], float]
) -> None:
    server, _, queries = served
    answer = get_reward(server, {"query": queries})
    assert answer["rewards"] == pytest.approx(direct[0], abs=TOLERANCE)


def test_an_empty_query_list_gives_empty_lists(
    served: tuple[ServiceProcess, list[str], list[str]],
) -> None:
    answer = get_reward(served[0], {"query": [], "prompts": [], "labels": []})
    assert answer["rewards"] == answer["scores"] == []
    assert all(values == [] for values in answer["extra_logs"].values())


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"query": ["a", "b"], "prompts": ["a"]}, id="prompts-shorter"),
        pytest.param({"query": "a single string"}, id="query-not-a-list"),
        pytest.param({"prompts": ["a"]}, id="no-query"),
        pytest.param({"query": [1, 2]}, id="numbers"),
    ],
)
def test_bad_requests_get_the_envelope(
    served: tuple[ServiceProcess, list[str], list[str]], body: dict[str, Any]
) -> None:
    response = httpx.post(f"{served[0].url}/get_reward", json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "validation_error"


def test_the_client_chunks_get_reward_and_keeps_the_order(
    served: tuple[ServiceProcess, list[str], list[str]],
) -> None:
    from trainer_client import RewardClient

    server, prompts, queries = served
    whole = get_reward(server, {"query": queries, "prompts": prompts})
    with RewardClient(server.url, chunk_size=1, max_concurrency=3) as client:
        chunked = client.get_reward(queries, prompts)
    assert chunked.rewards == pytest.approx(whole["rewards"], abs=1e-6)
    assert chunked.scores == pytest.approx(whole["scores"], abs=1e-6)
    assert set(chunked.extra_logs) == set(whole["extra_logs"])
    assert chunked.extra_logs["baseline_cache"] == [1.0, 0.0, 0.0]


def test_openrlhf_reward_func_file_returns_tensors(
    served: tuple[ServiceProcess, list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer_client.adapters import openrlhf

    server, prompts, queries = served
    monkeypatch.setenv("CRS_URL", server.url)
    out = openrlhf.reward_func(queries, prompts, ["", "", ""])
    whole = get_reward(server, {"query": queries, "prompts": prompts})
    assert out["rewards"].tolist() == pytest.approx(whole["rewards"], abs=1e-5)
    assert out["scores"].tolist() == pytest.approx(whole["scores"], abs=1e-5)
    assert out["extra_logs"]["baseline_cache"].tolist() == [1.0, 0.0, 0.0]
    monkeypatch.delenv("CRS_URL")
    with pytest.raises(RuntimeError, match="CRS_URL"):
        openrlhf.reward_func(queries, prompts, None)
