"""The client's own models of the HTTP API's bodies (DESIGN.md 4).

They mirror the service's schemas without importing them: ``trainer_client`` speaks HTTP only
and must install without the server's dependencies. Answers ignore fields they do not know, so
that a newer service adding one does not break an older client; inputs refuse unknown fields,
so that a misspelt key fails here with the item's index rather than as a 422 from the server.
Value rules (non-empty strings, known roles, aggregates) are left to the service, the one
place that states them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Prompt = str | list[dict[str, str]]
BaselineSource = Literal["cache", "computed", "missing", "unavailable"]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The item as sent: optional fields left out rather than sent as null."""
        return self.model_dump(exclude_none=True)


class Item(_Input):
    """One pair to score: a prompt (text or chat messages) and a response."""

    prompt: Prompt
    response: str
    prompt_id: str | None = None


class BaselineItem(_Input):
    """One prompt's baseline responses, for ``PUT /v1/baselines``.

    ``upload_id`` (1-128 printable ASCII characters) names this upload of this prompt: an
    append whose id the prompt has applied already is not applied again. ``push_baselines``
    gives a random one when it is None.
    """

    prompt: Prompt
    responses: list[str]
    prompt_id: str | None = None
    upload_id: str | None = None


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ModelRef(_Answer):
    """The model that answered: its name and version (``<name>@<digest>``)."""

    name: str
    version: str
    # "draining": another version is active on that replica now (None from older services).
    state: str | None = None


class RewardResult(_Answer):
    """One item's rewards, as ``POST /v1/rewards`` answers it, plus the model version.

    ``baseline``, ``contrastive`` and ``baseline_source`` are None when the request skipped
    baselines (``contrastive=None``); ``contrastive`` is also None for a prompt without a
    baseline under ``on_missing: null``.
    """

    reward: float
    baseline: float | None = None
    contrastive: float | None = None
    baseline_n: int = 0
    baseline_source: BaselineSource | None = None
    tokens: int
    truncated: bool
    model_version: str = Field(description="the version that scored this item")


class RewardsAnswer(_Answer):
    """The body of a ``POST /v1/rewards`` answer (the results without their version yet)."""

    model: ModelRef
    results: list[dict[str, Any]]


class BaselineStored(_Answer):
    """One uploaded prompt: the statistics of its baseline rewards, and whether it was kept."""

    prompt_id: str
    n: int
    mean: float
    std: float
    min: float
    max: float
    stored: bool
    error: str | None = None
    error_type: str | None = Field(
        default=None,
        description="why it was not stored: not_ready or conflict (worth a retry), store_full "
        "or corrupt_entry (not)",
    )
    duplicate: bool = Field(
        default=False,
        description="an append of an upload id applied before: nothing was added this time",
    )
    upload_id: str | None = None
    model_version: str = Field(description="the version that scored this prompt's responses")


class BaselinesPutAnswer(_Answer):
    """The body of a ``PUT /v1/baselines`` answer (one request's)."""

    model: ModelRef
    stored: int
    failed: int
    results: list[dict[str, Any]]


class BaselinesPushResult(_Answer):
    """The answer to a whole ``push_baselines`` call, over all of its requests.

    ``results`` are in the order of the items given. ``model`` answered the request of the
    last items (None when there were none, and nothing was sent); each result names its own
    version, which differs from it only if the active model was swapped during the upload.
    """

    model: ModelRef | None
    stored: int
    failed: int
    results: list[BaselineStored]


class RebaselineInfo(_Answer):
    """Progress of rescoring the stored baseline responses with a new version (an eager
    activation's, before it switches)."""

    state: str = Field(description="running | done | failed")
    prompts_total: int = 0
    prompts_done: int = 0
    responses_scored: int = 0
    prompts_cached_already: int = Field(
        default=0, description="prompts whose rewards another replica had cached already"
    )
    error: str | None = None


class ModelInfo(_Answer):
    """One model version the service knows of (``GET /v1/models``).

    Fields after ``error`` are None when the service predates model management.
    """

    name: str
    version: str
    path: str | None = None
    state: str = Field(description="loading | ready | active | draining | failed")
    error: str | None = None
    in_flight: int | None = Field(default=None, description="requests holding this version")
    loaded_at: float | None = Field(default=None, description="Unix time the load finished")
    activated_at: float | None = Field(default=None, description="Unix time it became active")
    rebaseline: RebaselineInfo | None = None
    default: bool | None = Field(
        default=None, description="whether a request that names no model gets this name"
    )


class ModelsInfo(_Answer):
    """The service's active model version and every model it has loaded.

    ``active`` is the default name's active version; ``active_versions`` that of every name
    (empty from a service that serves one model and does not list it).
    """

    active: str | None = None
    default: str | None = Field(default=None, description="the name a request gets by default")
    active_versions: dict[str, str | None] = Field(default_factory=dict)
    models: list[ModelInfo]

    @field_validator("active", mode="before")
    @classmethod
    def _version_of(cls, value: Any) -> Any:
        # The service answers {"name", "version"}; older ones a bare version: take either, and
        # keep the version.
        if isinstance(value, dict):
            return value.get("version")
        return value


class OpenRLHFRewards(_Answer):
    """The answer of ``POST /get_reward`` (OpenRLHF's protocol): what PPO optimises
    (``rewards``: contrastive where a baseline exists), the raw ``scores``, and numeric
    ``extra_logs`` columns, all as long as the queries."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]

    @classmethod
    def joined(cls, parts: Sequence[OpenRLHFRewards]) -> OpenRLHFRewards:
        """Answers of consecutive chunks, as one."""
        keys = parts[0].extra_logs if parts else {}
        return cls(
            rewards=[r for part in parts for r in part.rewards],
            scores=[s for part in parts for s in part.scores],
            extra_logs={k: [v for part in parts for v in part.extra_logs[k]] for k in keys},
        )
