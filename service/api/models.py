"""Models and hot swap (DESIGN.md 4): ``GET /v1/models`` and the admin plane.

The admin routes exist only when ``CRS_ADMIN_TOKEN`` is set, and only that token opens them.
A load answers 202 once the version is known (its files are read, not its weights) and goes on
in the background; activation with ``rebaseline: eager`` first scores every stored baseline
response with the new version, so its first contrastive rewards come from the cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request

from service.api.auth import require_admin_token, require_api_token
from service.api.deps import Services, ServicesDep, parse_body, registry_errors
from service.api.errors import ServiceError
from service.api.openapi import json_body
from service.api.schemas import (
    ModelActivate,
    ModelActivated,
    ModelLoad,
    ModelLoadAccepted,
    ModelRef,
    ModelsResponse,
    ModelUnloaded,
    ModelVersionInfo,
    RebaselineInfo,
)
from service.baselines.rebaseline import RebaselineProgress, rebaseline
from service.scoring.registry import Lease, ModelEntry, ModelSpec
from service.scoring.types import ModelLoadError, RewardInput

log = logging.getLogger("crs.api.models")

router = APIRouter(dependencies=[Depends(require_api_token)], tags=["models"])
admin = APIRouter(dependencies=[Depends(require_admin_token)], tags=["admin"])

# A golden file is a check, not a dataset: bounded like one request.
GOLDEN_MAX_ITEMS = 4096
GOLDEN_MAX_BYTES = 32 * 1024 * 1024
GOLDEN_SHOWN = 5


@router.get("/v1/models")
async def list_models(services: ServicesDep) -> ModelsResponse:
    """Every served name, its active version and every version held, with its state, the
    error of a failed load and the progress of a rebaseline."""
    registry = services.registry
    default = registry.default_name
    active = registry.active(default)
    return ModelsResponse(
        active=ModelRef(name=active.name, version=active.version) if active else None,
        default=default,
        active_versions={
            name: entry.version if (entry := registry.active(name)) else None
            for name in registry.names
        },
        models=[version_info(entry, default) for entry in registry.entries()],
    )


def version_info(entry: ModelEntry, default: str | None) -> ModelVersionInfo:
    status = entry.status
    progress = status.rebaseline
    return ModelVersionInfo(
        name=entry.name,
        version=entry.version,
        path=str(entry.path),
        state=status.state,
        error=status.error,
        in_flight=status.in_flight,
        loaded_at=status.loaded_at,
        activated_at=status.activated_at,
        default=entry.name == default,
        rebaseline=RebaselineInfo.model_validate(progress.as_dict()) if progress else None,
    )


@admin.post("/admin/models", status_code=202, openapi_extra=json_body(ModelLoad))
async def load_model(request: Request, services: ServicesDep) -> ModelLoadAccepted:
    """Load a model directory as a new version (of ``name``, default the default model's) in
    the background; poll ``GET /v1/models`` for its state. 422 when the directory cannot be a
    reward model, 409 when that version is held already or the name is busy."""
    body = await parse_body(request, ModelLoad, services.settings)
    golden = await read_golden(Path(body.golden)) if body.golden else None
    tolerance = body.golden_tolerance
    if tolerance is None:
        tolerance = services.settings.golden_tolerance
    spec = ModelSpec(path=Path(body.path), name=body.name, label_index=body.label_index)
    with registry_errors():
        entry = await services.registry.load(
            spec,
            activate=body.activate,
            before_activate=before_activate(services, body.rebaseline),
            check=golden_check(golden, tolerance) if golden else None,
        )
    log.info("loading %s from %s (activate: %s)", entry.version, entry.path, body.activate)
    return ModelLoadAccepted(
        name=entry.name, version=entry.version, path=str(entry.path), state=entry.state
    )


@admin.post("/admin/models/{version}/activate")
async def activate_model(version: str, request: Request, services: ServicesDep) -> ModelActivated:
    """Make a ready version its name's active one; answers once it is (after the eager
    rebaseline), and the previous version drains. Already active: ``changed: false``."""
    options = ModelActivate()
    if await request.body():
        options = await parse_body(request, ModelActivate, services.settings)
    with registry_errors():
        done = await services.registry.activate(
            version, before_activate(services, options.rebaseline)
        )
    return ModelActivated(
        name=done.entry.name,
        version=done.entry.version,
        state=done.entry.state,
        previous=done.previous,
        changed=done.changed,
    )


@admin.delete("/admin/models/{version}")
async def unload_model(version: str, services: ServicesDep) -> ModelUnloaded:
    """Unload a ready or failed version (its memory goes back), or cancel a load; the active
    version cannot be unloaded (activate another first)."""
    with registry_errors():
        entry = await services.registry.unload(version)
    return ModelUnloaded(name=entry.name, version=entry.version, state="unloaded")


# --- activation: baselines follow the model --------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineScoring:
    """A lease's version and its raw scoring, for the rebaseline pass (which counts the
    refusals of single prompts itself rather than getting envelope errors)."""

    lease: Lease

    @property
    def version(self) -> str:
        return self.lease.version

    async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
        return [s.reward for s in await self.lease.score(pairs, truncation="left")]


def before_activate(
    services: Services, mode: Literal["eager", "lazy"]
) -> Callable[[ModelEntry], Awaitable[None]] | None:
    """What runs before a version becomes active: the eager rebaseline, or nothing."""
    if mode == "lazy":
        return None

    async def eager(entry: ModelEntry) -> None:
        progress = RebaselineProgress()
        entry.status.rebaseline = progress
        log.info("rebaselining the stored prompts with %s before activating it", entry.version)
        with services.registry.lease_of(entry) as lease:
            await rebaseline(
                services.baselines.store, EngineScoring(lease), progress, observer=services.metrics
            )
        if progress.state != "done":
            raise RuntimeError(
                f"the rebaseline with {entry.version} failed ({progress.error}); the active "
                'version is unchanged: retry, or activate with "rebaseline": "lazy"'
            )

    return eager


# --- golden sets -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GoldenItem:
    item: RewardInput
    reward: float


async def read_golden(path: Path) -> list[GoldenItem]:
    """The golden file's items, or 422 naming what is wrong with it."""
    try:
        return await asyncio.to_thread(parse_golden, path)
    except (OSError, ValueError) as exc:
        raise ServiceError(422, f"golden file {path}: {exc}", error_type="invalid_golden") from exc


def parse_golden(path: Path) -> list[GoldenItem]:
    """JSONL of ``{"prompt": text or messages, "response": text, "reward": number}``."""
    if path.stat().st_size > GOLDEN_MAX_BYTES:
        raise ValueError(f"larger than {GOLDEN_MAX_BYTES} bytes")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        items.append(golden_item(json.loads(line), number))
        if len(items) > GOLDEN_MAX_ITEMS:
            raise ValueError(f"more than {GOLDEN_MAX_ITEMS} items")
    if not items:
        raise ValueError("no items")
    return items


def golden_item(record: Any, number: int) -> GoldenItem:
    if not isinstance(record, dict):
        raise ValueError(f"line {number} is not an object")
    prompt, response, reward = (record.get(key) for key in ("prompt", "response", "reward"))
    if not isinstance(prompt, str | list) or not isinstance(response, str):
        raise ValueError(f"line {number} needs a prompt and a response")
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        raise ValueError(f"line {number} needs a finite number as its reward")
    return GoldenItem(RewardInput(prompt=prompt, response=response), float(reward))


def golden_check(
    golden: list[GoldenItem], tolerance: float
) -> Callable[[ModelEntry], Awaitable[None]]:
    """Scores the golden items with the new version; a load whose scores differ by more than
    ``tolerance`` (times the expected magnitude when above 1) fails, naming the worst."""

    async def check(entry: ModelEntry) -> None:
        scores = await entry.engine.score([g.item for g in golden], truncation="left")
        off = [
            (index, score.reward, g.reward)
            for index, (score, g) in enumerate(zip(scores, golden, strict=True))
            if not abs(score.reward - g.reward) <= tolerance * max(1.0, abs(g.reward))
        ]
        if off:
            shown = "; ".join(
                f"item {i} scored {got:.6g}, expected {want:.6g}"
                for i, got, want in off[:GOLDEN_SHOWN]
            )
            raise ModelLoadError(
                f"golden mismatch: {len(off)} of {len(golden)} items off by more than "
                f"{tolerance:g}: {shown} (bfloat16 scores differ by about 1e-2: raise "
                "golden_tolerance if that is expected)"
            )
        log.info("golden set: %d items within %g", len(golden), tolerance)

    return check
