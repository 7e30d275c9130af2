"""Baselines: upload (scored with the active model), read, delete and count (DESIGN.md 4)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api.auth import require_api_token
from service.api.deps import ServicesDep, parse_body, take_lease
from service.api.errors import ServiceError
from service.api.openapi import json_body
from service.api.rewards import LeaseScoring, model_ref
from service.api.schemas import (
    BaselineDeleted,
    BaselineRecord,
    BaselinesPut,
    BaselinesPutResponse,
    BaselinesSummary,
    BaselineStats,
    BaselineStored,
    ModelName,
    ModelRef,
    PromptIdPath,
)
from service.baselines import contrastive
from service.baselines.service import Upload, Uploaded
from service.baselines.store import StoreFull, StoreUnavailable
from trainer_client.prompt_id import prompt_id

router = APIRouter(dependencies=[Depends(require_api_token)], tags=["baselines"])


async def baselines_body(request: Request, services: ServicesDep) -> BaselinesPut:
    return await parse_body(request, BaselinesPut, services.settings)


BaselinesBody = Annotated[BaselinesPut, Depends(baselines_body)]


@router.put("/v1/baselines", openapi_extra=json_body(BaselinesPut))
async def put_baselines(body: BaselinesBody, services: ServicesDep) -> BaselinesPutResponse:
    """Score each prompt's responses with the named model's active version and store them with
    their rewards.

    ``replace`` (default) is idempotent; an ``append`` with an ``upload_id`` is applied once
    however often it is sent. Each prompt says whether the store holds it (``"stored"``, exactly
    what Redis holds, also after a lost reply) and else why (``error_type``). When nothing was
    stored the whole answer is an error: 503 with Retry-After when a retry can help, 507
    ``store_full`` when Redis is out of memory, 409 ``corrupt_entry``."""
    responses = sum(len(item.responses) for item in body.items)
    if responses > (limit := services.settings.max_items_per_request):
        raise ServiceError(
            413,
            f"{responses} responses exceed the limit of {limit} per request; split the upload",
            details={"responses": responses, "max_items_per_request": limit},
        )
    uploads = unique_uploads(body)
    truncation = services.settings.truncation
    with take_lease(services, body.model) as lease:
        done = await services.baselines.upload(uploads, body.mode, LeaseScoring(lease, truncation))
    stored = sum(result.stored for result in done)
    results = [stored_result(result) for result in done]
    if done and not stored:
        raise nothing_stored(results)
    return BaselinesPutResponse(
        model=model_ref(lease),
        stored=stored,
        failed=len(done) - stored,
        results=results,
    )


# When no prompt was stored: the status of the most hopeful failure (a retry that can work
# first), so a client retries exactly when it may help.
NOTHING_STORED: list[tuple[str, int, dict[str, str] | None]] = [
    ("not_ready", 503, {"Retry-After": "1"}),
    ("conflict", 503, {"Retry-After": "1"}),
    ("store_full", 507, None),
    ("corrupt_entry", 409, None),
]


def nothing_stored(results: list[BaselineStored]) -> ServiceError:
    """The error of an upload of which the store kept no prompt; details list each prompt."""
    kinds = {result.error_type for result in results}
    error_type, status, headers = next(
        (entry for entry in NOTHING_STORED if entry[0] in kinds), NOTHING_STORED[0]
    )
    first = next(result for result in results if result.error_type == error_type)
    return ServiceError(
        status,
        f"the baseline store kept none of {len(results)} prompt(s): {first.error}",
        error_type="not_ready" if status == 503 else error_type,
        details={"results": [result.model_dump() for result in results]},
        headers=headers,
    )


def unique_uploads(body: BaselinesPut) -> list[Upload]:
    """The uploads in request order; a prompt twice in one request is refused (which of the two
    should win is the caller's to say)."""
    uploads = [
        Upload(
            prompt_id=prompt_id(item.prompt_value(), item.prompt_id),
            prompt=item.prompt_value(),
            responses=list(item.responses),
            upload_id=item.upload_id,
        )
        for item in body.items
    ]
    seen: dict[str, int] = {}
    for index, upload in enumerate(uploads):
        if upload.prompt_id in seen:
            raise ServiceError(
                422,
                f"prompt {upload.prompt_id} appears twice (items {seen[upload.prompt_id]} and "
                f"{index}); send each prompt once per request",
                details={"prompt_id": upload.prompt_id, "items": [seen[upload.prompt_id], index]},
            )
        seen[upload.prompt_id] = index
    return uploads


def stored_result(result: Uploaded) -> BaselineStored:
    return BaselineStored(
        prompt_id=result.prompt_id,
        **dataclasses.asdict(result.stats),
        stored=result.stored,
        error=result.error,
        error_type=result.error_type,
        duplicate=result.duplicate,
        upload_id=result.upload_id,
    )


@router.get("/v1/baselines/{prompt_id:path}")
async def get_baseline(
    prompt_id: PromptIdPath, services: ServicesDep, model: ModelName | None = None
) -> BaselineRecord:
    """A stored prompt's responses, and their rewards under the named model's active version
    (null when it has not scored them yet; any rewards request for the prompt computes them)."""
    version = take_lease(services, model).version  # only the version: nothing is scored
    with store_errors():
        found = await services.baselines.store.lookup([prompt_id], version, with_responses=True)
    stored = found.get(prompt_id)
    if stored is not None and stored.corrupt:
        raise ServiceError(
            404,
            f"prompt {prompt_id}'s stored value was not written by crs and cannot be read; "
            "DELETE it, then upload it again",
        )
    if stored is None or stored.responses is None:
        raise ServiceError(404, f"no baseline stored for prompt {prompt_id}")
    return BaselineRecord(
        prompt_id=prompt_id,
        model_version=version,
        responses=stored.responses,
        rewards=stored.rewards,
        stats=stats_of(prompt_id, stored.rewards),
    )


@router.delete("/v1/baselines/{prompt_id:path}")
async def delete_baseline(prompt_id: PromptIdPath, services: ServicesDep) -> BaselineDeleted:
    """Forget a prompt's responses (and with them every version's rewards)."""
    with store_errors():
        deleted = await services.baselines.store.delete(prompt_id)
    if not deleted:
        raise ServiceError(404, f"no baseline stored for prompt {prompt_id}")
    return BaselineDeleted(prompt_id=prompt_id, deleted=True)


@router.get("/v1/baselines")
async def count_baselines(
    services: ServicesDep, model: ModelName | None = None
) -> BaselinesSummary:
    """How many prompts are stored, and how many have rewards under the named model's active
    version."""
    lease = take_lease(services, model)  # only its version: nothing is scored
    store = services.baselines.store
    with store_errors():
        prompts, scored = await store.counts(lease.version)
    return BaselinesSummary(
        model=ModelRef(name=lease.name, version=lease.version),
        store=store.kind,
        prompts=prompts,
        with_rewards=scored,
    )


def stats_of(prompt_id: str, rewards: list[float] | None) -> BaselineStats | None:
    if not rewards:
        return None
    stats = contrastive.BaselineStats.of(rewards)
    return BaselineStats(prompt_id=prompt_id, **dataclasses.asdict(stats))


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """A store failure as 503 with the envelope (reads and deletes have nothing to degrade to)."""
    try:
        yield
    except StoreFull as exc:
        raise ServiceError(507, str(exc)) from exc
    except StoreUnavailable as exc:
        raise ServiceError(503, str(exc), headers={"Retry-After": "1"}) from exc
