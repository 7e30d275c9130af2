"""``POST /get_reward``: OpenRLHF's remote reward model protocol (``--remote_rm_url``).

OpenRLHF sends ``{"query": [...], "prompts": [...], "labels": [...]}``, each query the policy's
formatted prompt followed by the generated tokens decoded with their special tokens (so it ends
with the policy's end token), and reads ``rewards`` (what PPO optimises), ``scores`` and
``extra_logs``.

One rendering rule serves both terms of the contrastive reward (docs/openrlhf.md):

- the raw reward scores ``query`` as sent, as OpenRLHF's own reward server does (no template,
  no special tokens added; the response is what follows ``prompts[i]``);
- the baseline responses of ``prompts[i]`` are rendered as a query would be:
  ``prompts[i] + response_j + end_marker``, where the end marker is what the query ends with
  (the longest known end-of-sequence text, see ``end_marker``). Their rewards are cached under
  a version of their own, ``<model version>+openrlhf:<sha256(marker)[:8]>``, beside the
  reward model's own template (``<model version>``, what ``GET /v1/baselines`` reports).

OpenRLHF turns every ``extra_logs`` list into a tensor, so every value there is a number: the
raw reward, the baseline (0 without one) and one 0/1 column per baseline source, whose batch
mean is the hit rate.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from service.api.auth import check_api_token
from service.api.deps import Services, parse_body, services_of, take_lease
from service.api.disconnect import unless_disconnected
from service.api.errors import ServiceError
from service.api.openapi import json_body
from service.api.rewards import engine_errors, reference, refuse_unavailable
from service.api.schemas import GetRewardRequest, GetRewardResponse, ModelName, OnUnavailable
from service.baselines.service import Baseline
from service.scoring.formatting import prompt_text
from service.scoring.registry import Lease
from service.scoring.types import RewardInput
from trainer_client.prompt_id import prompt_id

log = logging.getLogger("crs.api.compat")

router = APIRouter(tags=["compatibility"])
SOURCES = ("cache", "computed", "missing", "unavailable")
RENDERING = "openrlhf"
# Tokenizer files whose ``*_token`` entries name the reward tokenizer's special tokens.
TOKENIZER_FILES = ("special_tokens_map.json", "tokenizer_config.json")


@dataclass(frozen=True, slots=True)
class Query:
    """One query under the rendering rule: what is scored, and how its baselines render."""

    input: RewardInput  # the query as sent; prompt and response only identify it
    prompt_id: str | None  # of prompts[i]; None without prompts
    marker: str  # the end-of-sequence text the query ends with ("" when none)

    @property
    def key(self) -> tuple[str, str] | None:
        """Which rendered baseline the query compares with: its prompt's, with its marker."""
        return None if self.prompt_id is None else (self.prompt_id, self.marker)


@router.post("/get_reward", openapi_extra=json_body(GetRewardRequest))
async def get_reward(request: Request, model: ModelName | None = None) -> GetRewardResponse:
    """Rewards for formatted queries; contrastive where ``prompts[i]`` has a baseline, both
    terms rendered by the same rule (module docstring). ``?model=NAME`` picks a served model
    (OpenRLHF's ``--remote_rm_url`` may carry it); one version scores the whole request."""
    # Auth and the body by plain calls, not dependencies (services_of says why).
    services = services_of(request)
    check_api_token(request, services)
    # CRS_MAX_ITEMS_PER_REQUEST bounds the queries here, before any of them is validated.
    body = await parse_body(request, GetRewardRequest, services.settings, items_field="query")
    with take_lease(services, model) as lease:
        return await leased_reward(request, body, lease, services)


async def leased_reward(
    request: Request, body: GetRewardRequest, lease: Lease, services: Services
) -> GetRewardResponse:
    """``get_reward`` under one lease."""
    prompts = body.prompts
    if prompts is not None and len(prompts) != len(body.query):
        raise ServiceError(
            422,
            f"'prompts' has {len(prompts)} entries for {len(body.query)} queries",
            details={"queries": len(body.query), "prompts": len(prompts)},
        )
    if not body.query:
        return GetRewardResponse(rewards=[], scores=[], extra_logs=empty_logs())
    settings = services.settings
    markers = end_markers(settings.get_reward_end_markers, lease)
    queries = [
        query_input(query, prompts[i] if prompts else None, markers)
        for i, query in enumerate(body.query)
    ]
    warn_not_prefix(queries)
    on_unavailable = body.on_unavailable or settings.get_reward_on_unavailable
    if on_unavailable == "error":
        # Refuse before scoring anything when the store cannot give the baselines.
        found = await unless_disconnected(request, rendered_baselines(lease, services, queries))
        by_prompt = {key[0]: baseline for key, baseline in found.items()}
        refuse_unavailable(list(by_prompt), by_prompt, settings.store_cooldown_s)
        raw = await unless_disconnected(request, score_queries(lease, queries))
    else:
        raw, found = await unless_disconnected(
            request,
            asyncio.gather(
                score_queries(lease, queries), rendered_baselines(lease, services, queries)
            ),
        )
    baselines = [found[q.key] if q.key else Baseline("missing") for q in queries]
    return answer(raw, baselines, settings.get_reward_on_missing, on_unavailable)


def query_input(query: str, prompt: str | None, markers: Sequence[str] = ()) -> Query:
    """The query as an already formatted input, scored as sent; the response is what follows
    the prompt, and the end marker is what the query ends with."""
    if prompt is None:
        return Query(RewardInput(prompt="", response=query, text=query), None, "")
    # A query that does not start with its prompt has no response by the rule: it is still
    # scored as sent (and counted in the log), its response taken as the whole query.
    response = query[len(prompt) :] if query.startswith(prompt) else query
    scored = RewardInput(prompt=prompt, response=response, text=query)
    return Query(scored, prompt_id(prompt), end_marker(query, markers))


def warn_not_prefix(queries: Sequence[Query]) -> None:
    """Log the queries that do not start with their prompt: their baselines' rendering cannot
    match theirs (OpenRLHF cut the prompt, or its decode does not give the prompt back)."""
    count = sum(
        q.prompt_id is not None and not (q.input.text or "").startswith(str(q.input.prompt))
        for q in queries
    )
    if count:
        log.warning(
            "/get_reward: %d of %d queries do not start with their prompt; their baselines are "
            "rendered from the prompt all the same",
            count,
            len(queries),
        )


def end_marker(query: str, markers: Sequence[str]) -> str:
    """The trailing end-of-sequence text of ``query``: the longest of ``markers`` that it ends
    with (with any whitespace after it), or "" when it ends with none of them (a generation
    cut at its length limit)."""
    body = query.rstrip()
    found = max((m for m in markers if m and body.endswith(m)), key=len, default="")
    return query[len(body) - len(found) :] if found else ""


def end_markers(configured: Sequence[str], lease: Lease) -> list[str]:
    """``CRS_GET_REWARD_END_MARKERS`` and the reward tokenizer's special token strings."""
    specials = tokenizer_special_tokens(lease.info.path, lease.version)
    return sorted({*configured, *specials}, key=len, reverse=True)


@functools.lru_cache(maxsize=8)
def tokenizer_special_tokens(model_dir: Path, version: str) -> tuple[str, ...]:
    """The special token strings that the model directory's tokenizer files name (keyed by
    version too: a model replaced in place gets a new one)."""
    del version  # only the cache key
    found: set[str] = set()
    for name in TOKENIZER_FILES:
        try:
            config = json.loads((model_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict):
            found.update(special_strings(config))
    return tuple(sorted(found))


def special_strings(config: dict[str, Any]) -> set[str]:
    """``bos_token``, ``eos_token``, ... and ``additional_special_tokens`` of a tokenizer file;
    each a string or ``{"content": ...}``."""
    values: list[Any] = [v for k, v in config.items() if k.endswith("_token")]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key)
        values.extend(extra.values() if isinstance(extra, dict) else extra or [])
    strings = {v.get("content") if isinstance(v, dict) else v for v in values}
    return {s for s in strings if isinstance(s, str) and s.strip()}


def rendering_version(version: str, marker: str) -> str:
    """The version that the OpenRLHF rendering's baseline rewards are cached under: one per
    end marker, never the reward model's own (template) version."""
    digest = hashlib.sha256(marker.encode("utf-8")).hexdigest()[:8]
    return f"{version}+{RENDERING}:{digest}"


def rendered(prompt: str, response: str, marker: str) -> str:
    """A baseline response rendered as a query: prompt, response, and the end marker unless
    the response already ends with it."""
    return prompt + response + ("" if response.endswith(marker) else marker)


async def rendered_baselines(
    lease: Lease, services: Services, queries: Sequence[Query]
) -> dict[tuple[str, str], Baseline]:
    """The baseline of each (prompt, marker) of the queries, rendered by the rule: one lookup
    of all their prompts per end marker (a batch of queries almost always has one)."""
    by_marker: dict[str, dict[str, str]] = {}
    for q in queries:
        if q.prompt_id is not None:
            by_marker.setdefault(q.marker, {})[q.prompt_id] = str(q.input.prompt)
    found = await asyncio.gather(
        *(
            services.baselines.resolve(prompts, RenderedScoring(lease, marker))
            for marker, prompts in by_marker.items()
        )
    )
    return {
        (pid, marker): baseline
        for marker, baselines in zip(by_marker, found, strict=True)
        for pid, baseline in baselines.items()
    }


@dataclass(frozen=True, slots=True)
class RenderedScoring:
    """Scores baseline responses rendered as the queries that end with ``marker`` are, under
    the lease's version, and names the version their rewards are cached under. The prompt of
    each pair is its prompt id's text: /get_reward ids are the digest of it."""

    lease: Lease
    marker: str

    @property
    def version(self) -> str:
        return rendering_version(self.lease.version, self.marker)

    async def score(self, pairs: Sequence[RewardInput]) -> list[float]:
        inputs = [
            RewardInput(
                prompt=p.prompt,
                response=p.response,
                text=rendered(prompt_text(p.prompt), p.response, self.marker),
            )
            for p in pairs
        ]
        with engine_errors():
            return [s.reward for s in await self.lease.score(inputs, truncation="left")]


async def score_queries(lease: Lease, queries: Sequence[Query]) -> list[float]:
    # Cut from the left rather than refuse: a 422 in the middle of a PPO step stops training.
    with engine_errors():
        scores = await lease.score([q.input for q in queries], truncation="left")
    return [score.reward for score in scores]


def answer(
    raw: list[float], baselines: list[Baseline], on_missing: str, on_unavailable: OnUnavailable
) -> GetRewardResponse:
    """The response: contrastive where a baseline was found; else, for a store failure, what
    ``on_unavailable`` says (null: 0.0, the neutral contrastive reward; raw: the raw reward),
    and for a prompt without baseline what ``CRS_GET_REWARD_ON_MISSING`` says."""
    rewards, base = [], []
    for reward, baseline in zip(raw, baselines, strict=True):
        if (ref := reference(baseline, "mean")) is not None:
            rewards.append(reward - ref.value)
            base.append(ref.value)
        elif baseline.source == "unavailable":
            rewards.append(reward if on_unavailable == "raw" else 0.0)
            base.append(0.0)
        else:
            rewards.append(reward if on_missing == "raw" else 0.0)
            base.append(0.0)
    logs = {"raw_reward": raw, "baseline": base}
    for source in SOURCES:
        logs[f"baseline_{source}"] = [float(b.source == source) for b in baselines]
    if unavailable := sum(b.source == "unavailable" for b in baselines):
        log.warning(
            "/get_reward: the baseline store was unavailable for %d of %d queries; answered %s",
            unavailable,
            len(baselines),
            "the raw reward" if on_unavailable == "raw" else "0.0 (on_unavailable=null)",
        )
    return GetRewardResponse(rewards=rewards, scores=raw, extra_logs=logs)


def empty_logs() -> dict[str, list[float]]:
    return {"raw_reward": [], "baseline": [], **{f"baseline_{s}": [] for s in SOURCES}}
