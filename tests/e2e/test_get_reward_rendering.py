"""``POST /get_reward`` renders both terms of the contrastive reward by one rule, on a real
server with a real ``redis-server``: the policy's template (ChatML) is not the reward model's
(tiny llama's), and the queries end with the policy's end token as OpenRLHF sends them. Checked
against direct ``transformers`` forwards; then the store is killed under each
``on_unavailable``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from tests.models import DirectScorer
from trainer_client.launch import RedisProcess, ServiceProcess
from trainer_client.prompt_id import prompt_id

TOLERANCE = 1e-4
END = "<|im_end|>"  # the policy's end token; not a token of the reward model
QUESTIONS = ["What is the capital of France?", "Name a prime number."]
ANSWERS = [["Paris.", "It is Paris, on the Seine."], ["Seven."]]
# As the policy sampled them: with or without its end token (a sample cut at the length limit).
BASELINES = [["Paris, I think.", "Lyon?" + END, "It is Paris."], ["Two.", "Nine is not."]]


def policy_prompt(question: str) -> str:
    """The policy's chat template (ChatML), with the generation prompt."""
    return f"<|im_start|>user\n{question}{END}\n<|im_start|>assistant\n"


def policy_query(question: str, answer: str, end: str = END) -> str:
    """What OpenRLHF sends: the formatted prompt and the generation decoded with its specials."""
    return policy_prompt(question) + answer + end


class Direct:
    """Plain forwards of texts as they are, no special tokens added (the reward model is a
    chat-format model: the text carries what it has)."""

    def __init__(self, model: Path) -> None:
        self.scorer = DirectScorer(model)

    def reward(self, text: str) -> float:
        import torch

        tokenizer, model = self.scorer.tokenizer, self.scorer.model
        with torch.no_grad():
            batch = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            return float(model(**batch).logits[0, 0])

    def baseline(self, prompt: str, responses: list[str], marker: str) -> float:
        texts = [prompt + r + ("" if r.endswith(marker) else marker) for r in responses]
        return float(np.mean([self.reward(text) for text in texts]))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("redis-rendering")) as server:
        yield server


@pytest.fixture(scope="module")
def served(tiny_llama: Path, store: RedisProcess) -> Iterator[ServiceProcess]:
    """The service with both prompts' baselines pushed as docs/openrlhf.md says: the prompt as
    the policy formats it, the responses as sampled."""
    env = {"CRS_REDIS_URL": store.url, "CRS_STORE_COOLDOWN_S": "0"}
    with ServiceProcess(tiny_llama, env=env) as server:
        server.wait_ready()
        items = [
            {"prompt": policy_prompt(q), "responses": b}
            for q, b in zip(QUESTIONS, BASELINES, strict=True)
        ]
        pushed = httpx.put(f"{server.url}/v1/baselines", json={"items": items}, timeout=60)
        assert pushed.status_code == 200, pushed.text
        yield server


def get_reward(server: ServiceProcess, body: dict[str, Any], status: int = 200) -> Any:
    response = httpx.post(f"{server.url}/get_reward", json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def batch(end: str = END) -> tuple[list[str], list[str], list[int]]:
    queries, prompts, which = [], [], []
    for i, (question, answers) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        for answer in answers:
            queries.append(policy_query(question, answer, end))
            prompts.append(policy_prompt(question))
            which.append(i)
    return queries, prompts, which


@pytest.mark.parametrize("end", [END, ""], ids=["end-token", "cut-at-length"])
def test_contrastive_rewards_are_r_minus_b_with_both_terms_rendered_alike(
    served: ServiceProcess, tiny_llama: Path, end: str
) -> None:
    direct = Direct(tiny_llama)
    queries, prompts, which = batch(end)
    first = get_reward(served, {"query": queries, "prompts": prompts})
    second = get_reward(served, {"query": queries, "prompts": prompts})
    raw = [direct.reward(query) for query in queries]
    base = [direct.baseline(prompts[j], BASELINES[i], end) for j, i in enumerate(which)]
    for answer in (first, second):
        assert answer["scores"] == pytest.approx(raw, abs=TOLERANCE)
        assert answer["extra_logs"]["baseline"] == pytest.approx(base, abs=TOLERANCE)
        expected = [r - b for r, b in zip(raw, base, strict=True)]
        assert answer["rewards"] == pytest.approx(expected, abs=TOLERANCE)
    assert second["extra_logs"]["baseline_cache"] == [1.0] * len(queries)


def test_the_rendering_has_its_own_cache_key_and_the_template_version_stays(
    served: ServiceProcess, store: RedisProcess
) -> None:
    queries, prompts, _ = batch()
    get_reward(served, {"query": queries, "prompts": prompts})
    summary = httpx.get(f"{served.url}/v1/baselines", timeout=10).json()
    version = summary["model"]["version"]
    assert "+" not in version
    assert summary["with_rewards"] == summary["prompts"] == 2  # the template's, from the PUT
    marker = hashlib.sha256(END.encode()).hexdigest()[:8]
    client = redis.Redis.from_url(store.url)
    try:
        for question in QUESTIONS:
            pid = prompt_id(policy_prompt(question))
            assert client.exists(f"crs:{{{pid}}}:rewards:{version}")
            assert client.exists(f"crs:{{{pid}}}:rewards:{version}+openrlhf:{marker}")
    finally:
        client.close()


def test_a_lone_surrogate_is_a_422_not_a_500(served: ServiceProcess) -> None:
    for body in (b'{"query": ["a\\ud800"]}', b'{"query": ["a"], "prompts": ["\\udc00"]}'):
        response = httpx.post(
            f"{served.url}/get_reward",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["type"] == "validation_error"


@pytest.mark.parametrize("option", ["null", "raw", "error"])
def test_a_killed_store_answers_what_on_unavailable_says(
    tiny_llama: Path, tmp_path: Path, option: str
) -> None:
    direct = Direct(tiny_llama)
    question = QUESTIONS[0]
    query, prompt = policy_query(question, ANSWERS[0][0]), policy_prompt(question)
    with RedisProcess(tmp_path / "redis") as dying:
        env = {"CRS_REDIS_URL": dying.url, "CRS_GET_REWARD_ON_UNAVAILABLE": option}
        with ServiceProcess(tiny_llama, env=env) as server:
            server.wait_ready()
            item = {"prompt": prompt, "responses": BASELINES[0]}
            pushed = httpx.put(f"{server.url}/v1/baselines", json={"items": [item]}, timeout=60)
            assert pushed.status_code == 200, pushed.text
            body = {"query": [query], "prompts": [prompt]}
            assert get_reward(server, body)["extra_logs"]["baseline_cache"] == [0.0]
            dying.kill()
            if option == "error":
                answer = get_reward(server, body, status=503)
                assert answer["error"]["type"] == "store_unavailable"
                assert answer["error"]["details"] == {"unavailable_prompt_ids": [prompt_id(prompt)]}
                return
            answer = get_reward(server, body)
            # The request key overrides the setting.
            other = get_reward(
                server, {**body, "on_unavailable": "raw" if option == "null" else "null"}
            )
    raw = direct.reward(query)
    assert answer["scores"] == pytest.approx([raw], abs=TOLERANCE)
    assert answer["extra_logs"]["baseline_unavailable"] == [1.0]
    expected = {"null": 0.0, "raw": raw}
    assert answer["rewards"] == pytest.approx([expected[option]], abs=TOLERANCE)
    assert other["rewards"] == pytest.approx(
        [expected["raw" if option == "null" else "null"]], abs=TOLERANCE
    )
