"""``POST /get_reward``: OpenRLHF's remote reward model protocol (``--remote_rm_url``).

OpenRLHF sends ``{"query": [...], "prompts": [...], "labels": [...]}``, each query the prompt and
the response with the chat template already applied, and reads ``rewards`` (what PPO
optimises), ``scores`` and ``extra_logs``. crs answers the contrastive reward (mean baseline
of ``prompts[i]``) where a baseline exists and otherwise the raw reward
(``CRS_GET_REWARD_ON_MISSING``).
OpenRLHF turns every ``extra_logs`` list into a tensor, so every value there is a number: the
raw reward, the baseline (0 without one) and one 0/1 column per baseline source, whose batch
mean is the hit rate.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api.auth import require_api_token
from service.api.deps import EngineDep, ServicesDep, parse_body
from service.api.disconnect import unless_disconnected
from service.api.errors import ServiceError
from service.api.openapi import json_body
from service.api.rewards import baseline_scorer, engine_errors, reference
from service.api.schemas import GetRewardRequest, GetRewardResponse
from service.baselines.service import Baseline
from service.scoring.engine import RewardEngine
from service.scoring.types import RewardInput
from trainer_client.prompt_id import prompt_id

router = APIRouter(dependencies=[Depends(require_api_token)], tags=["compatibility"])
SOURCES = ("cache", "computed", "missing", "unavailable")


async def get_reward_body(request: Request, services: ServicesDep) -> GetRewardRequest:
    return await parse_body(request, GetRewardRequest, services.settings)


GetRewardBody = Annotated[GetRewardRequest, Depends(get_reward_body)]


@router.post("/get_reward", openapi_extra=json_body(GetRewardRequest))
async def get_reward(
    request: Request, body: GetRewardBody, engine: EngineDep, services: ServicesDep
) -> GetRewardResponse:
    """Rewards for formatted queries; contrastive where ``prompts[i]`` has a baseline."""
    prompts = body.prompts
    if prompts is not None and len(prompts) != len(body.query):
        raise ServiceError(
            422,
            f"'prompts' has {len(prompts)} entries for {len(body.query)} queries",
            details={"queries": len(body.query), "prompts": len(prompts)},
        )
    if not body.query:
        return GetRewardResponse(rewards=[], scores=[], extra_logs=empty_logs())
    inputs = [
        query_input(query, prompts[i] if prompts else None) for i, query in enumerate(body.query)
    ]
    version = engine.info.version if engine.info else ""
    ids = [prompt_id(prompt) for prompt in prompts] if prompts else []
    resolving = services.baselines.resolve(
        dict(zip(ids, prompts or [], strict=True)), version, baseline_scorer(engine, "left")
    )
    raw, baselines = await unless_disconnected(
        request, asyncio.gather(score_queries(engine, inputs), resolving)
    )
    found = [baselines[pid] for pid in ids] if ids else [Baseline("missing")] * len(raw)
    return answer(raw, found, services.settings.get_reward_on_missing)


def query_input(query: str, prompt: str | None) -> RewardInput:
    """The query as an already formatted input; the response is what follows the prompt."""
    response = query[len(prompt) :] if prompt and query.startswith(prompt) else query
    return RewardInput(prompt=prompt or "", response=response, text=query)


async def score_queries(engine: RewardEngine, inputs: list[RewardInput]) -> list[float]:
    # Cut from the left rather than refuse: a 422 in the middle of a PPO step stops training.
    with engine_errors():
        return [score.reward for score in await engine.score(inputs, truncation="left")]


def answer(raw: list[float], baselines: list[Baseline], on_missing: str) -> GetRewardResponse:
    rewards, base = [], []
    for reward, baseline in zip(raw, baselines, strict=True):
        if (ref := reference(baseline, "mean")) is not None:
            rewards.append(reward - ref.value)
            base.append(ref.value)
        else:
            rewards.append(reward if on_missing == "raw" else 0.0)
            base.append(0.0)
    logs = {"raw_reward": raw, "baseline": base}
    for source in SOURCES:
        logs[f"baseline_{source}"] = [float(b.source == source) for b in baselines]
    return GetRewardResponse(rewards=rewards, scores=raw, extra_logs=logs)


def empty_logs() -> dict[str, list[float]]:
    return {"raw_reward": [], "baseline": [], **{f"baseline_{s}": [] for s in SOURCES}}
