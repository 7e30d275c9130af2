"""Request and response bodies of the HTTP API (DESIGN.md 4)."""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Literal

from fastapi import Path
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from service.settings import Truncation

NonEmpty = Annotated[str, StringConstraints(min_length=1), Field(strict=True)]
Role = Literal["system", "user", "assistant", "tool"]
BaselineSource = Literal["cache", "computed", "missing", "unavailable"]
OnUnavailable = Literal["null", "raw", "error"]
# A served model's name (CRS_MODELS NAME=DIR, or a directory's name).
ModelName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"),
    Field(strict=True, description="a served model's name; default the first"),
]
ModelVersion = Annotated[str, StringConstraints(min_length=1, max_length=300), Field(strict=True)]
# ASCII digits: Python's \d also takes other scripts' digits, JSON Schema's (ECMA) does not.
AGGREGATE = re.compile(r"(mean|median|min|max|quantile:(0(\.[0-9]+)?|1(\.0+)?))")


# What a prompt id may be, in one place: whatever PUT accepts, GET and DELETE
# /v1/baselines/{prompt_id} can name. A URL holds no line break (and the router matches none),
# HTTP servers bound the request line (512 characters stay under 7 KB percent-encoded), clients
# resolve '.' and '..' path segments, and lone surrogates are no text.
PROMPT_ID_MAX_CHARS = 512
PROMPT_ID_BANNED = frozenset({"Cc", "Cs", "Zl", "Zp"})
_NOT_IN_ID = r"\x00-\x1f\x7f-\x9f\u2028\u2029"  # the banned categories, for JSON Schema
_ID_CHAR = rf"[^{_NOT_IN_ID}/]"
_ID_HEAD = rf"[^{_NOT_IN_ID}./]"
_ID_SEGMENT = rf"(?:{_ID_HEAD}{_ID_CHAR}*|\.{_ID_HEAD}{_ID_CHAR}*|\.\.{_ID_CHAR}+)?"
PROMPT_ID_PATTERN = rf"^{_ID_SEGMENT}(?:/{_ID_SEGMENT})*$"
PROMPT_ID_DESCRIPTION = (
    f"1-{PROMPT_ID_MAX_CHARS} characters, no control characters or line breaks, no '.' or '..' "
    "between slashes; default sha256:<hex> of the canonical prompt"
)


def check_prompt_id(value: str) -> str:
    """A client's prompt id, refused unless every path can name it (see ``PromptId``)."""
    if len(value) > PROMPT_ID_MAX_CHARS:
        raise ValueError(f"a prompt_id has at most {PROMPT_ID_MAX_CHARS} characters")
    if bad := next((c for c in value if unicodedata.category(c) in PROMPT_ID_BANNED), None):
        raise ValueError(f"a prompt_id holds no control characters or line breaks ({bad!r})")
    if any(segment in {".", ".."} for segment in value.split("/")):
        raise ValueError("a prompt_id has no '.' or '..' segment (URLs resolve them away)")
    return value


PromptId = Annotated[
    str,
    Field(
        strict=True,
        min_length=1,
        max_length=PROMPT_ID_MAX_CHARS,
        description=PROMPT_ID_DESCRIPTION,
        json_schema_extra={"pattern": PROMPT_ID_PATTERN},
    ),
    AfterValidator(check_prompt_id),
]
# The same rule for the ``{prompt_id}`` of a path.
PromptIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=PROMPT_ID_MAX_CHARS,
        description=PROMPT_ID_DESCRIPTION,
        json_schema_extra={"pattern": PROMPT_ID_PATTERN},
    ),
    AfterValidator(check_prompt_id),
]


class StrictBody(BaseModel):
    """Requests refuse unknown fields: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ChatMessage(StrictBody):
    role: Role
    content: Annotated[str, Field(strict=True)]


class RewardItem(StrictBody):
    prompt: NonEmpty | Annotated[list[ChatMessage], Field(min_length=1)]
    # May be empty: a policy can emit its end token first, and that is a sample to score.
    response: Annotated[str, Field(strict=True)]
    prompt_id: PromptId | None = None

    def prompt_value(self) -> str | list[dict[str, str]]:
        """The prompt as plain data for formatting and identity."""
        if isinstance(self.prompt, str):
            return self.prompt
        return [message.model_dump() for message in self.prompt]


class ContrastiveOptions(StrictBody):
    aggregate: str = Field(
        default="mean",
        description="mean | median | min | max | quantile:<q> with 0 <= q <= 1",
        json_schema_extra={"pattern": f"^{AGGREGATE.pattern}$"},
    )
    normalize: Literal["none", "std"] = "none"
    on_missing: Literal["null", "raw", "error"] = "null"
    on_unavailable: OnUnavailable = Field(
        default="null",
        description="when the baseline store failed: null (contrastive null), raw (contrastive "
        "= reward) or error (503 store_unavailable listing the prompt ids)",
    )

    @field_validator("aggregate")
    @classmethod
    def _known_aggregate(cls, value: str) -> str:
        if not AGGREGATE.fullmatch(value):
            raise ValueError("must be mean, median, min, max or quantile:<q> with 0 <= q <= 1")
        return value


class RewardsRequest(StrictBody):
    items: list[RewardItem]
    model: ModelName | None = None
    model_version: ModelVersion | None = Field(
        default=None,
        description="pin a version: served by it while it is loaded, else 409 "
        "version_not_loaded naming the active one",
    )
    contrastive: ContrastiveOptions | None = Field(
        default_factory=ContrastiveOptions, description="null skips baselines"
    )
    truncation: Truncation | None = Field(
        default=None, description="over-long items: none (422) or left; default from settings"
    )


class ModelRef(BaseModel):
    name: str
    version: str
    state: Literal["active", "draining"] | None = Field(
        default=None,
        description="the version's state when it answered: draining means another version is "
        "active now (clients pinned to this one move on after the call)",
    )


class RewardResult(BaseModel):
    reward: float
    baseline: float | None = None
    contrastive: float | None = None
    baseline_n: int = 0
    baseline_source: BaselineSource | None = None
    tokens: int
    truncated: bool


class RewardsResponse(BaseModel):
    model: ModelRef
    results: list[RewardResult]


# --- baselines (DESIGN.md 4, "Baselines") ------------------------------------------------------


# 1-128 printable ASCII characters, chosen by the client per prompt and upload batch.
UploadId = Annotated[str, StringConstraints(pattern=r"^[\x20-\x7e]{1,128}$"), Field(strict=True)]


class BaselineItem(StrictBody):
    prompt: NonEmpty | Annotated[list[ChatMessage], Field(min_length=1)]
    prompt_id: PromptId | None = None
    # A response may be empty (a policy's immediate end token): a sample like any other.
    responses: Annotated[list[Annotated[str, Field(strict=True)]], Field(min_length=1)]
    upload_id: UploadId | None = Field(
        default=None,
        description="idempotency key of this prompt's upload, reused on every retry of it: an "
        "append whose id the prompt already applied is not applied again",
    )

    def prompt_value(self) -> str | list[dict[str, str]]:
        if isinstance(self.prompt, str):
            return self.prompt
        return [message.model_dump() for message in self.prompt]


class BaselinesPut(StrictBody):
    items: list[BaselineItem]
    model: ModelName | None = Field(
        default=None, description="whose active version scores the responses; default the first"
    )
    mode: Literal["replace", "append"] = Field(
        default="replace",
        description="replace: the responses become these (idempotent); append: added to them",
    )


class BaselineStats(BaseModel):
    """Summary of one prompt's baseline rewards under one model version."""

    prompt_id: str
    n: int
    mean: float
    std: float
    min: float
    max: float


class BaselineStored(BaselineStats):
    """One uploaded prompt: its statistics, and whether the store kept it."""

    stored: bool
    error: str | None = None
    error_type: Literal["not_ready", "store_full", "conflict", "corrupt_entry"] | None = Field(
        default=None,
        description="why it was not stored: not_ready (the store did not answer; retry), "
        "store_full (Redis is out of memory), conflict (changed meanwhile; retry), "
        "corrupt_entry (the prompt's stored value is not crs's; delete it)",
    )
    duplicate: bool = Field(
        default=False,
        description="an append whose upload_id was applied already: nothing added; n and the "
        "statistics are those stored now",
    )
    upload_id: str | None = None


class BaselinesPutResponse(BaseModel):
    model: ModelRef
    stored: int
    failed: int
    results: list[BaselineStored]


class BaselineRecord(BaseModel):
    """A stored prompt: its responses, and their rewards under the active model version (null
    when that version has not scored them yet)."""

    prompt_id: str
    model_version: str
    responses: list[str]
    rewards: list[float] | None
    stats: BaselineStats | None


class BaselinesSummary(BaseModel):
    model: ModelRef
    store: Literal["redis", "memory"]
    prompts: int
    with_rewards: int


class BaselineDeleted(BaseModel):
    prompt_id: str
    deleted: bool


# --- compatibility (DESIGN.md 4, "Compatibility") ----------------------------------------------


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request. Unknown keys are ignored: trainers add their own."""

    model_config = ConfigDict(extra="ignore")

    query: list[Annotated[str, Field(strict=True)]]
    prompts: list[Annotated[str, Field(strict=True)]] | None = None
    labels: list[object] | None = None
    on_unavailable: OnUnavailable | None = Field(
        default=None,
        description="when the baseline store failed: null (reward 0.0), raw (the raw reward) or "
        "error (503); default CRS_GET_REWARD_ON_UNAVAILABLE",
    )


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


# --- models and hot swap (DESIGN.md 4, "Models and hot swap") ----------------------------------


class RebaselineInfo(BaseModel):
    """Progress of the pass that scores the stored baseline responses with a new version."""

    model_config = ConfigDict(extra="allow")

    state: Literal["running", "done", "failed"]
    prompts_total: int | None = None
    prompts_done: int = 0
    error: str | None = None


class ModelVersionInfo(BaseModel):
    name: str
    version: str
    path: str
    state: Literal["loading", "ready", "active", "draining", "failed"]
    error: str | None = None
    in_flight: int
    loaded_at: float | None = None
    activated_at: float | None = None
    default: bool
    rebaseline: RebaselineInfo | None = None


class ModelsResponse(BaseModel):
    active: ModelRef | None = Field(description="the default model's active version")
    default: str | None
    active_versions: dict[str, str | None]
    models: list[ModelVersionInfo]


class ModelLoad(StrictBody):
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096), Field(strict=True)]
    name: ModelName | None = Field(
        default=None, description="the name it serves under; default the default model's"
    )
    activate: bool = Field(default=False, description="activate once loaded and checked")
    rebaseline: Literal["eager", "lazy"] = Field(
        default="eager",
        description="eager: score every stored baseline response before activating; lazy: "
        "on first use",
    )
    label_index: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    golden: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = Field(
        default=None,
        description="a JSONL file on the service's host of {prompt, response, reward}: the new "
        "version must score each within golden_tolerance, else the load fails",
    )
    golden_tolerance: Annotated[float, Field(ge=0, le=1e6)] | None = None


class ModelActivate(StrictBody):
    rebaseline: Literal["eager", "lazy"] = "eager"


class ModelLoadAccepted(BaseModel):
    name: str
    version: str
    path: str
    state: str


class ModelActivated(BaseModel):
    name: str
    version: str
    state: str
    previous: str | None
    changed: bool


class ModelUnloaded(BaseModel):
    name: str
    version: str
    state: str
