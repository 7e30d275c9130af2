"""Request and response bodies of the HTTP API (DESIGN.md 4)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from service.settings import Truncation

NonEmpty = Annotated[str, StringConstraints(min_length=1), Field(strict=True)]
Role = Literal["system", "user", "assistant", "tool"]
BaselineSource = Literal["cache", "computed", "missing", "unavailable"]
AGGREGATE = re.compile(r"(mean|median|min|max|quantile:(0(\.\d+)?|1(\.0+)?))")


class StrictBody(BaseModel):
    """Requests refuse unknown fields: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ChatMessage(StrictBody):
    role: Role
    content: Annotated[str, Field(strict=True)]


class RewardItem(StrictBody):
    prompt: NonEmpty | Annotated[list[ChatMessage], Field(min_length=1)]
    response: NonEmpty
    prompt_id: NonEmpty | None = None

    def prompt_value(self) -> str | list[dict[str, str]]:
        """The prompt as plain data for formatting and identity."""
        if isinstance(self.prompt, str):
            return self.prompt
        return [message.model_dump() for message in self.prompt]


class ContrastiveOptions(StrictBody):
    aggregate: str = Field(
        default="mean", description="mean | median | min | max | quantile:<q> with 0 <= q <= 1"
    )
    normalize: Literal["none", "std"] = "none"
    on_missing: Literal["null", "raw", "error"] = "null"

    @field_validator("aggregate")
    @classmethod
    def _known_aggregate(cls, value: str) -> str:
        if not AGGREGATE.fullmatch(value):
            raise ValueError("must be mean, median, min, max or quantile:<q> with 0 <= q <= 1")
        return value


class RewardsRequest(StrictBody):
    items: list[RewardItem]
    model_version: NonEmpty | None = Field(
        default=None, description="pin a version; 409 when another one is active"
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
