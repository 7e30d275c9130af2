"""A real ``crs-service serve --redis-url redis+cluster://...`` on a real three-master Redis
Cluster: pushed baselines give contrastive cache hits from every master, and a killed master
costs only the prompts of its slots (and the cluster's password reaches no log line)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.baselines.redis_store import responses_key
from tests.redis_cluster import RedisClusterProcess, spread_ids
from trainer_client.launch import ServiceProcess

PASSWORD = "Sekr1t-cluster-pw"
RESPONSES = ["a short answer", "a somewhat longer answer", "the longest answer of the three"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterProcess]:
    with RedisClusterProcess(tmp_path / "redis-cluster", password=PASSWORD) as started:
        yield started


def rewards(server: ServiceProcess, ids: list[str]) -> dict[str, Any]:
    items = [{"prompt": f"prompt {pid}", "prompt_id": pid, "response": "an answer"} for pid in ids]
    answer = httpx.post(
        f"{server.url}/v1/rewards", json={"items": items, "contrastive": {}}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return {pid: result for pid, result in zip(ids, answer.json()["results"], strict=True)}


def test_a_service_on_a_cluster_serves_baselines_and_survives_a_lost_master(
    tiny_llama: Path, cluster: RedisClusterProcess
) -> None:
    ids = spread_ids(cluster, "e2e-", 2)
    dead = [pid for pid in ids if cluster.node_of(responses_key(pid)) == 0]
    items = [{"prompt": f"prompt {pid}", "prompt_id": pid, "responses": RESPONSES} for pid in ids]
    with ServiceProcess(tiny_llama, args=["--redis-url", cluster.url]) as server:
        server.wait_ready()
        pushed = httpx.put(f"{server.url}/v1/baselines", json={"items": items}, timeout=60)
        assert pushed.status_code == 200, pushed.text
        means = {result["prompt_id"]: result["mean"] for result in pushed.json()["results"]}
        assert sorted(means) == sorted(ids)
        summary = httpx.get(f"{server.url}/v1/baselines", timeout=10).json()
        assert (summary["prompts"], summary["with_rewards"]) == (len(ids), len(ids))

        hits = rewards(server, ids)
        assert {pid: r["baseline_source"] for pid, r in hits.items()} == dict.fromkeys(ids, "cache")
        assert {pid: r["baseline"] for pid, r in hits.items()} == pytest.approx(means)
        for result in hits.values():
            assert result["contrastive"] == pytest.approx(result["reward"] - result["baseline"])

        cluster.kill(0)
        for _ in range(2):  # the second within the cool-down: the live masters still answer
            after = rewards(server, ids)
            assert {pid: r["baseline_source"] for pid, r in after.items()} == {
                pid: "unavailable" if pid in dead else "cache" for pid in ids
            }
            assert all(after[pid]["contrastive"] is None for pid in dead)
            assert all(after[pid]["reward"] == hits[pid]["reward"] for pid in ids)
        log = server.log_tail(400)
    assert "Redis Cluster node" in log  # the lost master was logged, its password not
    assert PASSWORD not in log
