"""POST /v1/rewards: raw, baseline and contrastive rewards for a batch of items."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, Request

from service.api.auth import check_api_token
from service.api.deps import Services, parse_body, services_of, take_lease
from service.api.disconnect import unless_disconnected
from service.api.errors import ServiceError
from service.api.openapi import json_body
from service.api.schemas import (
    BaselineSource,
    ContrastiveOptions,
    ModelRef,
    RewardItem,
    RewardResult,
    RewardsRequest,
    RewardsResponse,
)
from service.baselines.contrastive import BaselineStats, aggregate, contrastive
from service.baselines.service import Baseline
from service.scoring.batcher import (
    BatchFailed,
    Overloaded,
    QueueTimeout,
    ScoringUnavailable,
    ServiceStopping,
)
from service.scoring.engine import EngineNotReady
from service.scoring.registry import Lease
from service.scoring.types import (
    EmptyInput,
    InputTooLong,
    NonFiniteReward,
    RewardInput,
    Score,
)
from service.settings import Truncation
from trainer_client.prompt_id import prompt_id

log = logging.getLogger("crs.api")

router = APIRouter(tags=["rewards"])


@router.post("/v1/rewards", openapi_extra=json_body(RewardsRequest))
async def post_rewards(request: Request) -> RewardsResponse:
    """Score every item with the named model's active version (or the pinned one); results
    come in request order, with each prompt's baseline and the contrastive reward unless
    ``"contrastive": null``. One version scores the whole request, baselines included."""
    # Auth and the body by plain calls, not dependencies (services_of says why).
    services = services_of(request)
    check_api_token(request, services)
    body = await parse_body(request, RewardsRequest, services.settings)
    with take_lease(services, body.model, body.model_version) as lease:
        truncation = body.truncation or services.settings.truncation
        if body.contrastive is None:
            scores = await unless_disconnected(request, score_items(lease, body.items, truncation))
            results = [
                RewardResult(reward=score.reward, tokens=score.tokens, truncated=score.truncated)
                for score in scores
            ]
        else:
            results = await unless_disconnected(
                request, contrastive_results(lease, services, body, body.contrastive)
            )
    count_scored(services, results)
    return RewardsResponse(model=model_ref(lease), results=results)


def model_ref(lease: Lease) -> ModelRef:
    """The version that answered, and whether it is still the active one."""
    state = lease.entry.state
    return ModelRef(
        name=lease.name,
        version=lease.version,
        state=state if state in ("active", "draining") else None,
    )


async def contrastive_results(
    lease: Lease, services: Services, body: RewardsRequest, options: ContrastiveOptions
) -> list[RewardResult]:
    """The items' rewards beside their prompts' baselines, scored and looked up at once."""
    prompt_ids = [prompt_id(item.prompt_value(), item.prompt_id) for item in body.items]
    prompts = {pid: item.prompt_value() for pid, item in zip(prompt_ids, body.items, strict=True)}
    truncation = body.truncation or services.settings.truncation
    resolving = services.baselines.resolve(prompts, LeaseScoring(lease, "left"))
    if "error" in (options.on_missing, options.on_unavailable):
        # Refuse before scoring anything when a baseline is missing or unavailable.
        baselines = await resolving
        if options.on_unavailable == "error":
            refuse_unavailable(prompt_ids, baselines, services.settings.store_cooldown_s)
        if options.on_missing == "error":
            refuse_missing(prompt_ids, baselines)
        scores = await score_items(lease, body.items, truncation)
    else:
        scores, baselines = await asyncio.gather(
            score_items(lease, body.items, truncation), resolving
        )
    floor = services.settings.baseline_std_floor
    lookups = services.metrics.baseline_lookups
    # Once per prompt: the n responses of one prompt often come in one request.
    references = {pid: reference(b, options.aggregate) for pid, b in baselines.items()}
    results = []
    for score, pid in zip(scores, prompt_ids, strict=True):
        source = baselines[pid].source
        lookups.labels(source).inc()
        results.append(with_baseline(score, source, references[pid], options, floor))
    return results


@dataclass(frozen=True, slots=True)
class Reference:
    """What a prompt's baseline rewards come to for one request."""

    value: float  # the aggregate
    std: float
    n: int


def reference(baseline: Baseline, how: str) -> Reference | None:
    if not baseline.rewards:
        return None
    stats = BaselineStats.of(baseline.rewards)
    return Reference(value=aggregate(baseline.rewards, how), std=stats.std, n=stats.n)


def refuse_missing(prompt_ids: list[str], baselines: dict[str, Baseline]) -> None:
    """409 listing the prompts without a baseline (``on_missing: error``)."""
    missing = sorted({pid for pid in prompt_ids if baselines[pid].source == "missing"})
    if missing:
        raise ServiceError(
            409,
            f"no baseline for {len(missing)} prompt(s); push baselines first or use "
            "on_missing null|raw",
            details={"missing_prompt_ids": missing},
        )


def refuse_unavailable(
    prompt_ids: Sequence[str], baselines: Mapping[str, Baseline], cooldown_s: float
) -> None:
    """503 ``store_unavailable`` listing the prompts whose baseline the store could not give
    (``on_unavailable: error``); retry after the store's cool-down, no longer."""
    unavailable = sorted({pid for pid in prompt_ids if baselines[pid].source == "unavailable"})
    if unavailable:
        raise ServiceError(
            503,
            f"the baseline store is unavailable for {len(unavailable)} prompt(s); retry, or use "
            "on_unavailable null|raw",
            details={"unavailable_prompt_ids": unavailable},
            error_type="store_unavailable",
            headers={"Retry-After": str(max(1, math.ceil(cooldown_s)))},
        )


def with_baseline(
    score: Score,
    source: BaselineSource,
    ref: Reference | None,
    options: ContrastiveOptions,
    std_floor: float,
) -> RewardResult:
    """One result: reward, baseline and contrastive reward, or what ``on_unavailable`` (the
    store failed) or ``on_missing`` (no baseline stored) says."""
    result = RewardResult(
        reward=score.reward,
        tokens=score.tokens,
        truncated=score.truncated,
        baseline_source=source,
    )
    if ref is not None:
        result.baseline = ref.value
        result.baseline_n = ref.n
        result.contrastive = contrastive(
            score.reward, ref.value, ref.std, options.normalize, std_floor
        )
    elif source == "unavailable":
        # Not "missing": an outage must not silently swap r - b for r.
        if options.on_unavailable == "raw":
            result.contrastive = score.reward
    elif options.on_missing == "raw":
        result.contrastive = score.reward
    return result


def count_scored(services: Services, results: list[RewardResult]) -> None:
    metrics = services.metrics
    metrics.items_scored.inc(len(results))
    metrics.tokens_scored.inc(sum(result.tokens for result in results))
    metrics.items_truncated.inc(sum(result.truncated for result in results))


async def score_items(
    lease: Lease, items: Sequence[RewardItem], truncation: Truncation
) -> list[Score]:
    """The leased version's scores of the items, its refusals translated into the envelope."""
    inputs = [RewardInput(prompt=item.prompt_value(), response=item.response) for item in items]
    with engine_errors():
        return await lease.score(inputs, truncation=truncation)


@dataclass(frozen=True, slots=True)
class LeaseScoring:
    """A lease's version and its scoring, for baselines: ``BaselineService`` caches what it
    scores under ``version``, which comes from the same lease, so never under another."""

    lease: Lease
    truncation: Truncation

    @property
    def version(self) -> str:
        return self.lease.version

    async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
        with engine_errors():
            scores = await self.lease.score(pairs, truncation=self.truncation)
        return [s.reward for s in scores]


def too_long_details(exc: InputTooLong) -> dict[str, object]:
    """The over-long items by index: their tokens, or their characters when they were refused
    by their length in characters without being tokenised."""
    items: list[dict[str, int]] = [{"index": i, "tokens": n} for i, n in exc.lengths.items()]
    items += [{"index": i, "characters": n} for i, n in exc.characters.items()]
    details: dict[str, object] = {
        "items": sorted(items, key=lambda entry: entry["index"]),
        "max_input_tokens": exc.limit,
    }
    if exc.max_characters is not None:
        details["max_characters"] = exc.max_characters
    return details


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """The engine's refusals as envelope errors."""
    try:
        yield
    except InputTooLong as exc:
        raise ServiceError(422, str(exc), details=too_long_details(exc)) from exc
    except EmptyInput as exc:
        details = {"items": [{"index": i, "tokens": 0} for i in exc.indices]}
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
    except ScoringUnavailable as exc:
        # Shutting down or device threads dead: another replica can serve it, and soon.
        retry_after = "1" if isinstance(exc, ServiceStopping) else "5"
        raise ServiceError(503, str(exc), headers={"Retry-After": retry_after}) from exc
    except BatchFailed as exc:
        # Its message names an incident id and nothing internal; the log has the exception.
        raise ServiceError(500, str(exc)) from exc
