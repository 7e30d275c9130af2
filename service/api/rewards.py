"""POST /v1/rewards: raw, baseline and contrastive rewards for a batch of items."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api.auth import require_api_token
from service.api.deps import EngineDep, ServicesDep, parse_body
from service.api.disconnect import unless_disconnected
from service.api.errors import ServiceError
from service.api.openapi import json_body
from service.api.schemas import (
    ContrastiveOptions,
    ModelRef,
    RewardItem,
    RewardResult,
    RewardsRequest,
    RewardsResponse,
)
from service.scoring.batcher import BatchFailed, Overloaded, QueueTimeout
from service.scoring.engine import EngineNotReady, RewardEngine
from service.scoring.types import InputTooLong, NonFiniteReward, RewardInput, Score
from service.settings import Truncation
from trainer_client.prompt_id import prompt_id

log = logging.getLogger("crs.api")

router = APIRouter(dependencies=[Depends(require_api_token)], tags=["rewards"])


async def rewards_body(request: Request, services: ServicesDep) -> RewardsRequest:
    return await parse_body(request, RewardsRequest, services.settings)


RewardsBody = Annotated[RewardsRequest, Depends(rewards_body)]


@router.post("/v1/rewards", openapi_extra=json_body(RewardsRequest))
async def post_rewards(
    request: Request, body: RewardsBody, engine: EngineDep, services: ServicesDep
) -> RewardsResponse:
    """Score every item with the active reward model; results come in request order."""
    info = engine.info
    assert info is not None  # a ready engine has a model
    if body.model_version is not None and body.model_version != info.version:
        raise ServiceError(
            409,
            f"model version {body.model_version} is not loaded; the active one is {info.version}",
            details={"requested": body.model_version, "active": info.version},
        )
    if body.contrastive is not None and body.contrastive.on_missing == "error" and body.items:
        # No baseline store yet: every prompt is missing, so refuse before scoring anything.
        raise missing_baselines(body.items)
    scores = await unless_disconnected(
        request, score_items(engine, body, services.settings.truncation)
    )
    metrics = services.metrics
    metrics.items_scored.inc(len(scores))
    metrics.tokens_scored.inc(sum(score.tokens for score in scores))
    metrics.items_truncated.inc(sum(score.truncated for score in scores))
    results = [result_without_baseline(score, body.contrastive) for score in scores]
    return RewardsResponse(model=ModelRef(name=info.name, version=info.version), results=results)


async def score_items(
    engine: RewardEngine, body: RewardsRequest, default: Truncation
) -> list[Score]:
    """The engine's scores, with its refusals translated into the envelope."""
    inputs = [
        RewardInput(prompt=item.prompt_value(), response=item.response) for item in body.items
    ]
    truncation = body.truncation or default
    try:
        return await engine.score(inputs, truncation=truncation)
    except InputTooLong as exc:
        details = {
            "items": [{"index": i, "tokens": n} for i, n in sorted(exc.lengths.items())],
            "max_input_tokens": exc.limit,
        }
        raise ServiceError(422, str(exc), details=details) from exc
    except NonFiniteReward as exc:
        log.error("%s", exc)
        raise ServiceError(500, str(exc), details={"items": exc.indices}) from exc
    except EngineNotReady as exc:
        raise ServiceError(503, str(exc), headers={"Retry-After": "5"}) from exc
    except Overloaded as exc:
        raise ServiceError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except QueueTimeout as exc:
        raise ServiceError(504, f"timed out: {exc}") from exc
    except BatchFailed as exc:
        raise ServiceError(500, str(exc)) from exc


def result_without_baseline(score: Score, options: ContrastiveOptions | None) -> RewardResult:
    """A result for a prompt with no baseline (there is no baseline store yet)."""
    result = RewardResult(reward=score.reward, tokens=score.tokens, truncated=score.truncated)
    if options is None:
        return result
    result.baseline_source = "missing"
    if options.on_missing == "raw":
        result.contrastive = score.reward
    return result


def missing_baselines(items: list[RewardItem]) -> ServiceError:
    ids = sorted({prompt_id(item.prompt_value(), item.prompt_id) for item in items})
    return ServiceError(
        409,
        f"no baseline for {len(ids)} prompt(s); push baselines first or use on_missing null|raw",
        details={"missing_prompt_ids": ids},
    )
