"""Contrastive rewards from real servers and a real redis-server: values against a direct
transformers forward, sharing between replicas, computing for a new model version, and Redis
dying and coming back under load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.models import DirectScorer
from trainer_client.launch import RedisProcess, ServiceProcess

TOLERANCE = 1e-4
# How far one served reward may be from the direct forward's: float32 rounding of batches of
# another shape, or of a prompt run once for several items (1e-7 seen). Normalised rewards
# divide the error of a reward minus its baseline by the prompt's spread, which can be small.
REWARD_ERROR = 1e-6
K = 4
WORDS = "the reward model scores each answer to the prompt by how helpful it is"


def baseline_items(count: int) -> list[dict[str, Any]]:
    """``count`` prompts (strings and chats) with K responses each, varied in length."""
    rng = np.random.default_rng(3)
    words = WORDS.split()
    items = []
    for n in range(count):
        text = f"Question {n}: " + " ".join(rng.choice(words, size=4 + n % 7))
        prompt: Any = text if n % 2 else [{"role": "user", "content": text}]
        responses = [" ".join(rng.choice(words, size=2 + (3 * j + n) % 9)) for j in range(K)]
        items.append({"prompt": prompt, "responses": responses})
    return items


BASELINES = baseline_items(20)
QUERIES = [
    {"prompt": item["prompt"], "response": f"answer {j} " + item["responses"][j]}
    for item in BASELINES
    for j in range(2)
]


def reward_pairs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": i["prompt"], "response": r} for i in items for r in i["responses"]]


@pytest.fixture(scope="module")
def direct(tiny_llama: Path) -> DirectScorer:
    return DirectScorer(tiny_llama)


@pytest.fixture(scope="module")
def baseline_rewards(direct: DirectScorer) -> np.ndarray:
    """The K baseline rewards of each prompt, by a direct per-item forward."""
    return np.array(direct.rewards(reward_pairs(BASELINES))).reshape(len(BASELINES), K)


@pytest.fixture(scope="module")
def query_rewards(direct: DirectScorer) -> np.ndarray:
    return np.array(direct.rewards(QUERIES))


@pytest.fixture(scope="module")
def server(tiny_llama: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    with ServiceProcess(tiny_llama, args=["--redis-url", redis_server.url]) as process:
        process.wait_ready()
        pushed = httpx.put(f"{process.url}/v1/baselines", json={"items": BASELINES}, timeout=120)
        assert pushed.status_code == 200, pushed.text
        assert pushed.json()["stored"] == len(BASELINES)
        yield process


def rewards(server: ServiceProcess, items: list[dict[str, Any]], **options: Any) -> list[Any]:
    body = {"items": items, "contrastive": options}
    response = httpx.post(f"{server.url}/v1/rewards", json=body, timeout=120)
    assert response.status_code == 200, response.text
    results: list[Any] = response.json()["results"]
    return results


def expected_baseline(rewards: np.ndarray, aggregate: str) -> np.ndarray:
    """The aggregate of each row, computed with numpy, independently of the service."""
    if aggregate.startswith("quantile:"):
        return np.quantile(rewards, float(aggregate.split(":")[1]), axis=1)
    functions = {"mean": np.mean, "median": np.median, "min": np.min, "max": np.max}
    result: np.ndarray = functions[aggregate](rewards, axis=1)
    return result


@pytest.mark.parametrize("aggregate", ["mean", "median", "min", "max", "quantile:0.75"])
@pytest.mark.parametrize("normalize", ["none", "std"])
def test_contrastive_equals_reward_minus_aggregate_of_direct_baseline_rewards(
    server: ServiceProcess,
    baseline_rewards: np.ndarray,
    query_rewards: np.ndarray,
    aggregate: str,
    normalize: str,
) -> None:
    results = rewards(server, QUERIES, aggregate=aggregate, normalize=normalize)
    baseline = np.repeat(expected_baseline(baseline_rewards, aggregate), 2)
    spread = np.repeat(baseline_rewards.std(axis=1), 2) if normalize == "std" else 1.0
    expected = (query_rewards - baseline) / spread
    assert [r["reward"] for r in results] == pytest.approx(query_rewards, abs=TOLERANCE)
    assert [r["baseline"] for r in results] == pytest.approx(baseline, abs=TOLERANCE)
    error = np.abs(np.array([r["contrastive"] for r in results]) - expected)
    allowed = TOLERANCE + 2 * REWARD_ERROR / spread
    assert np.all(error <= allowed), f"errors {error.max():.3g}, allowed {allowed}"
    assert {(r["baseline_source"], r["baseline_n"]) for r in results} == {("cache", K)}
    # Different prompts have different baselines: a constant would pass the checks above.
    assert len({round(b, 6) for b in baseline}) > 10


def test_a_second_replica_sharing_redis_gets_cache_hits(
    tiny_llama: Path, redis_server: RedisProcess, server: ServiceProcess
) -> None:
    with ServiceProcess(tiny_llama, args=["--redis-url", redis_server.url]) as other:
        other.wait_ready()
        results = rewards(other, QUERIES[:6])
    assert [r["baseline_source"] for r in results] == ["cache"] * 6
    assert [r["contrastive"] for r in results] == pytest.approx(
        [r["contrastive"] for r in rewards(server, QUERIES[:6])], abs=TOLERANCE
    )


def test_a_new_model_version_computes_from_stored_responses_then_caches(
    tmp_path: Path, redis_server: RedisProcess, server: ServiceProcess
) -> None:
    from service.scoring.tiny import build_tiny_model

    other_model = build_tiny_model(tmp_path / "tiny-llama-7", "llama", seed=7)
    direct = DirectScorer(other_model)
    base = np.array(direct.rewards(reward_pairs(BASELINES[:3]))).reshape(3, K)
    queries = QUERIES[:6]
    with ServiceProcess(other_model, args=["--redis-url", redis_server.url]) as other:
        other.wait_ready()
        first = rewards(other, queries)
        second = rewards(other, queries)
    assert [r["baseline_source"] for r in first] == ["computed"] * 6
    assert [r["baseline_source"] for r in second] == ["cache"] * 6
    expected = np.array(direct.rewards(queries)) - np.repeat(base.mean(axis=1), 2)
    for results in (first, second):
        assert [r["contrastive"] for r in results] == pytest.approx(expected, abs=TOLERANCE)


def test_replace_is_idempotent_and_get_shows_the_stored_prompt(server: ServiceProcess) -> None:
    again = httpx.put(f"{server.url}/v1/baselines", json={"items": BASELINES[:2]}, timeout=60)
    assert again.status_code == 200, again.text
    pid = again.json()["results"][1]["prompt_id"]
    record = httpx.get(f"{server.url}/v1/baselines/{pid}", timeout=10).json()
    assert record["responses"] == BASELINES[1]["responses"]
    assert len(record["rewards"]) == K
    summary = httpx.get(f"{server.url}/v1/baselines", timeout=10).json()
    assert summary["store"] == "redis"
    assert summary["prompts"] >= len(BASELINES)


# --- Redis dying under load -------------------------------------------------------------------


class Stream:
    """Sends rewards requests back to back from a thread, keeping every answer."""

    def __init__(self, server: ServiceProcess, items: list[dict[str, Any]]) -> None:
        self.server, self.items = server, items
        self.answers: list[tuple[int, list[str]]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    body = {"items": self.items, "contrastive": {}}
                    response = client.post("/v1/rewards", json=body)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                sources = [r["baseline_source"] for r in response.json().get("results", [])]
                self.answers.append((response.status_code, sources))

    def until(self, condition: str, timeout_s: float = 60.0) -> None:
        """Wait until an answer after now has every item's source equal to ``condition``."""
        seen = len(self.answers)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(set(s) == {condition} for _, s in self.answers[seen:]):
                return
            time.sleep(0.01)
        raise AssertionError(f"no answer with every source {condition!r}: {self.answers[-3:]}")

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_redis_dying_and_coming_back_never_fails_a_request(
    tiny_llama: Path, tmp_path: Path
) -> None:
    redis = RedisProcess(tmp_path / "redis", persistent=True)
    with redis, ServiceProcess(tiny_llama, args=["--redis-url", redis.url]) as server:
        server.wait_ready()
        pushed = httpx.put(f"{server.url}/v1/baselines", json={"items": BASELINES[:4]})
        assert pushed.status_code == 200, pushed.text
        with Stream(server, QUERIES[:8]) as stream:
            stream.until("cache")
            redis.kill()
            stream.until("unavailable")
            redis.start()  # same data directory: the append-only file brings them back
            stream.until("cache")
        metrics = httpx.get(f"{server.url}/metrics").text
    assert stream.failures == []
    assert {status for status, _ in stream.answers} == {200}
    assert "crs_store_errors_total" in metrics


# --- the whole path: sample -> push -> reward -------------------------------------------------


def test_sample_push_reward_end_to_end(
    tiny_llama: Path, redis_server: RedisProcess, server: ServiceProcess, tmp_path: Path
) -> None:
    """Baselines sampled from a tiny policy, pushed by the CLI, then used by rewards requests:
    the contrastive rewards equal reward - mean of the sampled responses' direct rewards."""
    from transformers import AutoTokenizer

    from tests.models import save_tiny_policy
    from trainer_client.cli import main

    policy = save_tiny_policy(AutoTokenizer.from_pretrained(tiny_llama), tmp_path / "policy")
    prompts = [
        {"prompt": "What is the capital of France?"},
        {"prompt": [{"role": "user", "content": "Why is the sky blue?"}], "prompt_id": "sky"},
        {"prompt": "Name three animals."},
    ]
    prompts_file, samples = tmp_path / "prompts.jsonl", tmp_path / "baselines.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    sampled = main(
        ["sample-baselines", "--policy", str(policy), "--prompts", str(prompts_file)]
        + ["--out", str(samples), "-k", "3", "--max-new-tokens", "8", "--device", "cpu"]
        + ["--quiet"]
    )
    assert sampled == 0
    assert main(["push-baselines", str(samples), "--url", server.url, "--quiet"]) == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    direct = DirectScorer(tiny_llama)
    queries = [{"prompt": p["prompt"], "response": "A fine answer."} for p in prompts]
    queries[1]["prompt_id"] = "sky"
    results = rewards(server, queries)
    expected = []
    for row, query in zip(rows, queries, strict=True):
        base = direct.rewards([{"prompt": row["prompt"], "response": r} for r in row["responses"]])
        expected.append(direct.reward(query["prompt"], query["response"]) - float(np.mean(base)))
    assert [r["baseline_source"] for r in results] == ["cache"] * 3
    assert [r["baseline_n"] for r in results] == [3] * 3
    assert [r["contrastive"] for r in results] == pytest.approx(expected, abs=TOLERANCE)
