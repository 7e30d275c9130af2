"""The reference PPO trainer's settings: one frozen object, checked whole before any work.

Every field is a flag of ``crs-trainer train`` (dashes for underscores). A bad combination is
refused here with a ``ValueError`` that names the field, so that a typo costs a second, not a
model load and a half-finished run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeGuard

RewardMode = Literal["contrastive", "raw"]
RewardScale = Literal["none", "running-std", "lambda"]
OnMissingBaseline = Literal["error", "raw", "skip"]
OnStoreUnavailable = Literal["skip", "raw", "error"]
KLEstimator = Literal["k1", "k2", "k3"]
Device = Literal["auto", "cpu", "cuda"]

REWARD_MODES: tuple[RewardMode, ...] = ("contrastive", "raw")
REWARD_SCALES: tuple[RewardScale, ...] = ("none", "running-std", "lambda")
ON_MISSING_BASELINE: tuple[OnMissingBaseline, ...] = ("error", "raw", "skip")
ON_STORE_UNAVAILABLE: tuple[OnStoreUnavailable, ...] = ("skip", "raw", "error")
KL_ESTIMATORS: tuple[KLEstimator, ...] = ("k1", "k2", "k3")
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one PPO run needs; validated at construction (``ValueError`` naming the field).

    The reward fields say what PPO optimises: ``reward`` picks crs's raw reward or its
    contrastive reward (raw - the prompt's baseline), ``reward_scale`` an explicit factor on it,
    and the two ``on_*`` fields what to do with a sample that has no baseline. See
    docs/training.md for every field.
    """

    policy: Path
    prompts: Path
    out: Path
    urls: tuple[str, ...]
    token: str | None = None
    model: str | None = None
    reward: RewardMode = "contrastive"
    reward_scale: RewardScale = "none"
    lambda_max: float = 10.0
    on_missing_baseline: OnMissingBaseline = "error"
    on_store_unavailable: OnStoreUnavailable = "skip"
    iterations: int = 100
    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-5
    ppo_epochs: int = 4
    minibatch_size: int = 8
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
    kl_estimator: KLEstimator = "k1"
    whiten_advantages: bool = True
    seed: int = 0
    device: Device = "auto"
    save_every: int = 0
    resume: bool = False
    plots: bool = True
    quiet: bool = False
    overlap: bool = True
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        # Paths may arrive as strings (a JSON config, a caller's own code): keep Path fields Paths.
        for name in ("policy", "prompts", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "urls", tuple(self.urls))
        self._check_service()
        self._check_choices()
        self._check_counts()
        self._check_numbers()

    def _check_service(self) -> None:
        if not self.urls:
            raise ValueError("urls: give at least one crs service URL, e.g. http://rm-0:8000")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"urls: {url!r} is not an http:// or https:// URL")
        if self.token is not None and not self.token:
            raise ValueError("token must be a non-empty string or None")
        if self.model is not None and not self.model:
            raise ValueError("model must be a non-empty model name or None")

    def _check_choices(self) -> None:
        _one_of("reward", self.reward, REWARD_MODES)
        _one_of("reward_scale", self.reward_scale, REWARD_SCALES)
        _one_of("on_missing_baseline", self.on_missing_baseline, ON_MISSING_BASELINE)
        _one_of("on_store_unavailable", self.on_store_unavailable, ON_STORE_UNAVAILABLE)
        _one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _one_of("device", self.device, DEVICES)
        if self.reward_scale == "lambda" and self.reward != "contrastive":
            # lambda is the ratio of raw to contrastive reward scales: meaningless on raw rewards.
            raise ValueError("reward_scale 'lambda' needs reward 'contrastive'")

    def _check_counts(self) -> None:
        for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "kl_horizon"):
            _at_least(name, getattr(self, name), 1)
        _at_least("minibatch_size", self.minibatch_size, 1)
        if self.minibatch_size > self.batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be <= batch_size "
                f"({self.batch_size}): a minibatch is a part of one iteration's samples"
            )
        _at_least("save_every", self.save_every, 0)
        if self.torch_threads is not None:
            _at_least("torch_threads", self.torch_threads, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def _check_numbers(self) -> None:
        for name in ("temperature", "learning_rate", "clip_range", "clip_range_value"):
            _positive(name, getattr(self, name))
        _positive("max_grad_norm", self.max_grad_norm)
        for name in ("vf_coef", "ent_coef", "kl_coef"):
            _non_negative(name, getattr(self, name))
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not (_finite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not (_finite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (_finite(self.lambda_max) and self.lambda_max >= 1.0):
            raise ValueError(
                f"lambda_max must be >= 1 (lambda is clipped to [1, lambda_max]), "
                f"got {self.lambda_max!r}"
            )
        if self.kl_target is not None:
            _positive("kl_target", self.kl_target)

    def to_json(self) -> dict[str, Any]:
        """The settings as written to ``config.json``; the token is never written."""
        values = asdict(self)
        values.update(policy=str(self.policy), prompts=str(self.prompts), out=str(self.out))
        values["urls"] = list(self.urls)
        values["token"] = None if self.token is None else "***"
        return values

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of the settings, in declaration order (the CLI's flags)."""
        return [field.name for field in fields(cls)]


def _one_of(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _finite(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(name: str, value: object) -> None:
    if not (_finite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(name: str, value: object) -> None:
    if not (_finite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
