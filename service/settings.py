"""Service settings: one pydantic-settings class, environment prefix ``CRS_``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

InputFormat = Literal["auto", "chat", "pair"]
Truncation = Literal["none", "left"]
DeviceName = Literal["auto", "cpu", "cuda"] | str
DType = Literal["auto", "float32", "bfloat16", "float16"]

MiB = 1024 * 1024
KiB = 1024
MIN_TOKEN_CHARS = 8
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
REDACTED = "***"
QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")
# A Redis Cluster URL's scheme, and the scheme of one node's URL (TLS or not).
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
CLUSTER_URL_FORM = "redis+cluster://[user:password@]host:port[,host:port...][?option=value...]"
# The end-of-sequence texts of common chat templates (Llama 2, ChatML, Llama 3, GPT, Gemma).
GET_REWARD_END_MARKERS = (
    "</s>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<eos>",
    "<end_of_turn>",
)


class Settings(BaseSettings):
    """Everything the service reads from its environment (``CRS_*``) or the command line."""

    # hide_input_in_errors: a refused value (a token, a URL with a password) is never echoed.
    model_config = SettingsConfigDict(env_prefix="CRS_", extra="ignore", hide_input_in_errors=True)

    model_path: Path | None = Field(default=None, description="Hugging Face reward model directory")
    model_name: str | None = Field(default=None, description="name in the model version")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="several named models, NAME=DIR, comma separated (the first is the default); "
        "instead of CRS_MODEL_PATH",
    )
    keep_previous: bool = Field(
        default=False,
        description="after a swap keep the previous version loaded (ready) as the rollback target",
    )
    drain_idle_s: float = Field(
        default=2.0,
        ge=0,
        description="after a swap the previous version is unloaded once no request has used it "
        "this long (the rest of a call pinned to it still finds it)",
    )
    golden_tolerance: float = Field(
        default=1e-3,
        ge=0,
        description="a golden set's scores may differ from the expected by this much (scaled "
        "by the expected magnitude when above 1)",
    )
    label_index: int | None = Field(
        default=None, ge=0, description="which logit is the reward when num_labels > 1"
    )
    device: DeviceName = "auto"
    dtype: DType = Field(default="auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    input_format: InputFormat = "auto"
    trust_remote_code: bool = False
    allow_pickle_weights: bool = Field(
        default=False, description="load pytorch_model.bin (pickle can run code)"
    )

    max_input_tokens: int | None = Field(default=None, gt=0, description="default: model max")
    truncation: Truncation = "none"
    max_items_per_request: int = Field(default=4096, gt=0)
    max_body_bytes: int = Field(default=32 * MiB, gt=0)
    max_batch_tokens: int = Field(default=16384, gt=0, description="padded tokens per batch")
    batch_wait_ms: float = Field(
        default=2.0, ge=0, description="how long a small batch waits for more items"
    )
    min_batch_efficiency: float = Field(
        default=0.9, ge=0, le=1, description="least real/computed tokens a batch may have"
    )
    device_workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="forward threads sharing the device; default 1 on CUDA, 2 on a CPU",
    )
    prefix_reuse: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: a decoder model runs the prompt shared by several items of a batch "
        "once and scores their responses on its cache, when a load-time check finds it scores "
        "as the full forward does (float noise); off: every item runs in full",
    )
    max_queue_tokens: int = Field(
        default=1_048_576, gt=0, description="tokens waiting for a batch before 429"
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="a request not scored by then gets 504"
    )

    redis_url: str | None = Field(
        default=None,
        repr=False,  # it can carry a password
        description="baseline store; without it, in-process (one replica only)",
    )
    redis_connect_timeout_s: float = Field(default=0.25, gt=0)
    redis_socket_timeout_s: float = Field(default=0.5, gt=0)
    redis_max_connections: int = Field(default=32, ge=1)
    redis_retries: int = Field(default=1, ge=0, le=10, description="retries of a failed call")
    redis_health_check_s: float = Field(
        default=15.0, ge=0, description="ping an idle connection before reuse after this long"
    )
    baseline_budget_s: float = Field(
        default=1.0, gt=0, description="time a request may spend on the baseline store"
    )
    store_cooldown_s: float = Field(
        default=1.0, ge=0, description="after a store failure, answer 'unavailable' this long"
    )
    baseline_std_floor: float = Field(
        default=1e-3, gt=0, description="normalize=std never divides by less"
    )

    get_reward_on_missing: Literal["raw", "zero"] = Field(
        default="raw",
        description="POST /get_reward: the reward of an item whose prompt has no baseline",
    )
    get_reward_on_unavailable: Literal["null", "raw", "error"] = Field(
        default="null",
        description="POST /get_reward when the baseline store fails: null answers 0.0 (the "
        "neutral contrastive reward), raw the raw reward, error a 503",
    )
    get_reward_end_markers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(GET_REWARD_END_MARKERS),
        description="POST /get_reward: end-of-sequence texts a query may end with (a comma "
        "list, beside the reward tokenizer's special tokens); baseline responses get the same",
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            cluster_address(value)  # a clear error now rather than at the first lookup
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [entry.strip() for entry in value.split(",") if entry.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        names = []
        for entry in value:
            name, sep, path = entry.partition("=")
            if not sep or not NAME.fullmatch(name.strip()) or not path.strip():
                raise ValueError(
                    f"each model is NAME=DIR with NAME of letters, digits, '.', '_' or '-': "
                    f"{entry!r}"
                )
            names.append(name.strip())
        if len(set(names)) != len(names):
            raise ValueError(f"a model name appears twice: {names}")
        return value

    def model_specs(self) -> list[tuple[str | None, Path | None]]:
        """The configured models as (name, directory): ``CRS_MODELS`` in order, else the one of
        ``CRS_MODEL_PATH`` (named by ``CRS_MODEL_NAME`` or its directory)."""
        if self.models:
            pairs = [entry.partition("=") for entry in self.models]
            return [(name.strip(), Path(path.strip())) for name, _, path in pairs]
        return [(self.model_name, self.model_path)]

    @field_validator("get_reward_end_markers", mode="before")
    @classmethod
    def _split_markers(cls, value: object) -> object:
        if isinstance(value, str):
            return [marker.strip() for marker in value.split(",") if marker.strip()]
        return value

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    admin_token: SecretStr | None = None
    shutdown_timeout_s: float = Field(
        default=130.0,
        gt=0,
        description="after SIGTERM, how long requests in flight may finish before a 503",
    )
    drain_min_s: float = Field(
        default=0.0,
        ge=0,
        description="after SIGTERM, keep answering (/readyz 503) at least this long",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a connection must send its request headers by then"
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="a request body must arrive in full by then (else 408)"
    )
    keep_alive_s: int = Field(default=5, ge=1, description="an idle connection closes after this")
    max_connections: int = Field(
        default=1024, ge=1, description="open connections; idle ones are closed beyond it"
    )
    max_header_bytes: int = Field(default=64 * KiB, ge=1024, description="request line + headers")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        # A comma list, so tokens can be rotated by deploying "old,new" then "new".
        if isinstance(value, str):
            return [token.strip() for token in value.split(",") if token.strip()]
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_admin_token_is_none(cls, value: object) -> object:
        # An empty value (compose's ${CRS_ADMIN_TOKEN:-}, a Kubernetes Secret key left empty)
        # means no admin plane, as an unset one does, rather than a token refused as too short.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check_tokens(self) -> Settings:
        # Name the setting and the minimum, never the value: a token is a secret.
        named = [("CRS_API_TOKENS", token) for token in self.api_tokens]
        if self.admin_token is not None:
            named.append(("CRS_ADMIN_TOKEN", self.admin_token))
        for setting, token in named:
            if len(token.get_secret_value()) < MIN_TOKEN_CHARS:
                raise ValueError(
                    f"{setting}: every token must be at least {MIN_TOKEN_CHARS} characters long"
                )
        return self

    def for_log(self) -> dict[str, Any]:
        """The settings as JSON, every secret redacted: tokens and the Redis URL's password."""
        shown = self.model_dump(mode="json")  # SecretStr fields dump as "**********"
        if self.redis_url is not None:
            shown["redis_url"] = redact_url(self.redis_url)
        return shown


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: the user and password of its authority
    (a user name can be a token) and a ``password=`` query parameter (redis-py reads one)."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return REDACTED
    if "@" in netloc:
        url = url.replace(netloc, f"{REDACTED}@{netloc.rpartition('@')[2]}", 1)
    return QUERY_PASSWORD.sub(rf"\g<1>{REDACTED}", url)


@dataclass(frozen=True, slots=True)
class ClusterAddress:
    """Where a Redis Cluster is: its startup nodes, and the URL of the first one carrying the
    credentials and options of the cluster URL (what redis-py reads)."""

    nodes: tuple[tuple[str, int], ...]
    node_url: str


def cluster_address(url: str) -> ClusterAddress | None:
    """The nodes of a ``redis+cluster://`` (or ``rediss+cluster://``) URL; None for a
    single-node URL. A malformed cluster URL raises ``ValueError`` naming what is wrong, never
    its credentials."""
    scheme, sep, rest = url.partition("://")
    node_scheme = CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    if node_scheme is None:
        if scheme.lower() in ("redis", "rediss") and "," in _hosts(url):
            raise ValueError(
                f"a Redis URL names one node; for a Redis Cluster use {CLUSTER_URL_FORM}"
            )
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"unreadable Redis Cluster URL; the form is {CLUSTER_URL_FORM}") from None
    userinfo, at, hosts = parts.netloc.rpartition("@")
    entries = hosts.split(",")
    nodes = tuple(_cluster_node(entry, n, len(entries)) for n, entry in enumerate(entries, 1))
    if parts.path not in ("", "/", "/0"):
        raise ValueError("a Redis Cluster has database 0 only: leave the URL's path out")
    host, port = nodes[0]
    shown = f"[{host}]" if ":" in host else host
    query = f"?{parts.query}" if parts.query else ""
    return ClusterAddress(nodes, f"{node_scheme}://{userinfo}{at}{shown}:{port}{query}")


def _hosts(url: str) -> str:
    """The hosts part of a URL ("" when unreadable: redis-py says what is wrong with it)."""
    try:
        return urlsplit(url).netloc.rpartition("@")[2]
    except ValueError:
        return ""


def _cluster_node(entry: str, number: int, count: int) -> tuple[str, int]:
    """One ``host:port`` of a cluster URL (the port is required: nodes rarely share one). The
    error names its place, not its text: a mistyped URL may hold a password there."""
    try:
        parts = urlsplit(f"//{entry.strip()}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None or parts.username is not None:
        raise ValueError(
            f"node {number} of {count} of the Redis Cluster URL is not host:port; the form is "
            f"{CLUSTER_URL_FORM}"
        )
    return host, port
