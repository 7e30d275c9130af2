"""A running server's rewards equal a direct per-item transformers forward (fp32, 1e-4)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.models import DirectScorer, mixed_items
from trainer_client.launch import ServiceProcess

TOLERANCE = 1e-4
ITEMS = mixed_items(64, seed=7)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_bert", "minilm_rm"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[ServiceProcess, Path]]:
    model_dir: Path = request.getfixturevalue(request.param)
    # A small batch budget, so the 64 items really run as several padded batches.
    with ServiceProcess(model_dir, args=["--max-batch-tokens", "2048"]) as server:
        server.wait_ready()
        yield server, model_dir


@pytest.fixture(scope="module")
def expected(served: tuple[ServiceProcess, Path]) -> list[float]:
    return DirectScorer(served[1]).rewards(ITEMS)


def test_one_request_of_64_items_matches_direct_forward(
    served: tuple[ServiceProcess, Path], expected: list[float]
) -> None:
    server, _ = served
    response = httpx.post(f"{server.url}/v1/rewards", json={"items": ITEMS}, timeout=120)
    assert response.status_code == 200, response.text
    rewards = [result["reward"] for result in response.json()["results"]]
    assert rewards == pytest.approx(expected, abs=TOLERANCE)
    # A constant model would pass the comparison above; these rewards must differ by item.
    assert len({round(reward, 6) for reward in rewards}) > 32


def test_64_concurrent_single_item_requests_match_direct_forward(
    served: tuple[ServiceProcess, Path], expected: list[float]
) -> None:
    server, _ = served

    async def score_each() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            responses = await asyncio.gather(
                *(client.post("/v1/rewards", json={"items": [item]}) for item in ITEMS)
            )
        assert {r.status_code for r in responses} == {200}
        return [r.json()["results"][0] for r in responses]

    results = asyncio.run(score_each())
    assert [r["reward"] for r in results] == pytest.approx(expected, abs=TOLERANCE)
    assert all(r["truncated"] is False for r in results)
