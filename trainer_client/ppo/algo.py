"""PPO math for the reference trainer, in pure torch.

Shapes follow one convention: B rows (samples) by T response positions. ``mask`` is 1 on real
response tokens (the EOS included) and 0 on the padding after a response. Position t of a
logprob tensor is log pi(response token t | prompt, response[:t]); ``values[:, t]`` is the
critic's value of the state before token t.

The trainer imports this module lazily, so torch at the top here never reaches
``import trainer_client``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]

# Added to the variance before whitening so a batch of equal values does not divide by zero.
_WHITEN_EPS = 1e-8
# Ziegler et al. (2019) bound the adaptive controller's proportional error to this.
_KL_ERROR_CLIP = 0.2


def _weights(mask: Tensor, like: Tensor) -> Tensor:
    """The mask as numbers of ``like``'s dtype, so bool and float masks behave the same."""
    return mask.to(dtype=like.dtype, device=like.device)


def _require_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}")


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under its logits: (B, T, V), (B, T) -> (B, T).

    Half-precision logits are promoted to float32 first: log_softmax over a large vocabulary
    loses too much in 16 bits for a probability ratio that PPO exponentiates.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy in nats of each position's distribution: (B, T, V) -> (B, T).

    ``xlogy`` gives 0 for zero-probability entries, so logits masked to -inf (top-k or top-p
    filtering) do not turn the entropy into NaN.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    plogp: Tensor = torch.special.xlogy(probs, probs)
    return -plogp.sum(dim=-1)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (all of them, or along ``dim``).

    An empty mask gives 0 rather than NaN: a batch whose responses are all empty should not
    poison the optimiser.
    """
    weights = _weights(mask, values)
    if dim is None:
        return (values * weights).sum() / weights.sum().clamp(min=1.0)
    return (values * weights).sum(dim=dim) / weights.sum(dim=dim).clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over the masked positions (a scalar).

    With ``unbiased`` the Bessel correction n / (n - 1) applies; with fewer than two masked
    positions it is skipped (there is no spread to correct) instead of dividing by zero.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = _weights(mask, values).sum()
        if count >= 2:
            variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Scale ``values`` to unit variance over the masked positions; padding comes out 0.

    With ``shift_mean`` the result also has mean 0; without it the mean is kept, which is what
    a reward (whose sign matters) wants, as opposed to an advantage.
    """
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * _weights(mask, values)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens' logprobs.

    Schulman's estimators: k1 = logp - ref is unbiased but can be negative; k2 = (logp - ref)^2 / 2
    and k3 = exp(ref - logp) - (ref - logp) - 1 are always >= 0, k3 also unbiased.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: a KL penalty on every response token, the score at the last one.

    The InstructGPT / Stiennon et al. shaping: ``-kl_coef * kl`` at each real token, plus
    ``scores[b]`` at the last real token of row b; padding gets 0. A row without any real token
    gets no score (there is no token to put it on).
    """
    _require_same_shape(kl=kl, mask=mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be ({kl.shape[0]},), got {tuple(scores.shape)}")
    weights = _weights(mask, kl)
    rewards = -kl_coef * kl * weights
    positions = torch.arange(kl.shape[1], device=kl.device)
    real = weights > 0
    last = torch.where(real, positions, 0).amax(dim=1)
    row_score = scores.to(dtype=rewards.dtype, device=rewards.device) * real.any(dim=1)
    return rewards.scatter_add(1, last.unsqueeze(1), row_score.unsqueeze(1))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked response tokens.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1} *
    m_{t+1}, so the value after the last real token counts as 0 (the episode ends there).
    Returns (advantages, returns = advantages + values), both 0 on padding and without gradient:
    they are targets. Not whitened; the caller decides.
    """
    _require_same_shape(rewards=rewards, values=values, mask=mask)
    with torch.no_grad():
        weights = _weights(mask, values)
        next_weights = torch.nn.functional.pad(weights[:, 1:], (0, 1))
        next_values = torch.nn.functional.pad(values[:, 1:], (0, 1)) * next_weights
        deltas = rewards + gamma * next_values - values
        advantages = torch.zeros_like(values)
        running = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            running = deltas[:, t] + gamma * lam * running * next_weights[:, t]
            advantages[:, t] = running
        advantages = advantages * weights
        returns = (advantages + values) * weights
    return advantages, returns


@dataclass(frozen=True)
class PolicyLoss:
    """The clipped surrogate loss (differentiable) and its diagnostics (detached)."""

    loss: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


@dataclass(frozen=True)
class ValueLoss:
    """The clipped value loss (differentiable) and how often the clip bound (detached)."""

    loss: Tensor
    clip_fraction: Tensor


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> PolicyLoss:
    """PPO's clipped surrogate: the pessimistic of the plain and the clipped objective.

    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))); clip_fraction is
    the share of tokens whose ratio lies outside [1 - eps, 1 + eps]; approx_kl is
    masked_mean((logp - old)^2 / 2), the k2 estimate of how far the update has moved.
    """
    _require_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        outside = ((ratio - 1.0).abs() > clip_range).to(dtype=ratio.dtype)
        clip_fraction = masked_mean(outside, mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> ValueLoss:
    """The clipped value loss: the worse of the plain and the clipped squared error, halved.

    v_clipped = old + clamp(v - old, -c, c) keeps one update from moving the critic far from the
    values the advantages were computed with. clip_fraction is the share of tokens where
    |v - old| > c, i.e. where the clip changed the value (the analogue of the policy's).
    """
    _require_same_shape(values=values, old_values=old_values, returns=returns)
    step = values - old_values
    clipped_values = old_values + torch.clamp(step, -clip_range_value, clip_range_value)
    squared = (values - returns) ** 2
    clipped_squared = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(squared, clipped_squared), mask)
    with torch.no_grad():
        outside = (step.abs() > clip_range_value).to(dtype=values.dtype)
        clip_fraction = masked_mean(outside, mask)
    return ValueLoss(loss=loss, clip_fraction=clip_fraction)


class KLController(Protocol):
    """What the trainer needs of a KL coefficient schedule (fixed or adaptive)."""

    @property
    def value(self) -> float: ...

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


def _coef_from_state(state: dict[str, float]) -> float:
    try:
        value = float(state["value"])
    except KeyError as missing:
        raise ValueError("KL controller state has no 'value'") from missing
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"KL controller state has an invalid value {value!r}")
    return value


class FixedKLController:
    """A constant KL coefficient: ``update`` leaves it as it is."""

    def __init__(self, kl_coef: float) -> None:
        if not math.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        self._value = float(kl_coef)

    @property
    def value(self) -> float:
        """The current KL coefficient."""
        return self._value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; kept so the trainer treats both controllers alike."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for a checkpoint."""
        return {"value": self._value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by ``state_dict``."""
        self._value = _coef_from_state(state)


class AdaptiveKLController:
    """Ziegler et al. (2019): steer the KL coefficient so the observed KL tracks a target.

    error = clip(kl / target - 1, -0.2, 0.2) and coef *= 1 + error * n_steps / horizon: a KL
    above target raises the penalty, below it lowers it, by at most 20 % per horizon of steps.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not math.isfinite(init_kl_coef) or init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be a finite number >= 0, got {init_kl_coef!r}")
        if not target > 0:
            raise ValueError(f"target must be > 0, got {target!r}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        self._value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    @property
    def value(self) -> float:
        """The current KL coefficient."""
        return self._value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after ``n_steps`` steps whose observed KL was ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -_KL_ERROR_CLIP), _KL_ERROR_CLIP)
        self._value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for a checkpoint; target and horizon come from the configuration."""
        return {"value": self._value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by ``state_dict``."""
        self._value = _coef_from_state(state)


class RunningMoments:
    """Count, mean, population std and mean |x| of every value seen, merged batch by batch.

    Each batch's moments are computed on their own and merged with Chan et al.'s parallel
    formula, which stays accurate over long runs where a naive sum of squares would cancel.
    Pure Python floats: the trainer keeps these across iterations and in its checkpoint.
    """

    def __init__(self) -> None:
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean
        self._mean_abs = 0.0

    @property
    def count(self) -> int:
        """How many values have been seen."""
        return self._count

    @property
    def mean(self) -> float:
        """Mean of the values seen (0.0 before any)."""
        return self._mean

    @property
    def std(self) -> float:
        """Population standard deviation (0.0 before any data: callers guard a division)."""
        if self._count == 0:
            return 0.0
        return math.sqrt(max(self._m2, 0.0) / self._count)

    @property
    def mean_abs(self) -> float:
        """Mean of |x| over the values seen (0.0 before any)."""
        return self._mean_abs

    def update(self, values: Sequence[float]) -> None:
        """Fold a batch in; an empty batch changes nothing, a non-finite value is refused."""
        batch = [float(value) for value in values]
        if not batch:
            return
        if not all(math.isfinite(value) for value in batch):
            raise ValueError("RunningMoments.update got a non-finite value")
        n = len(batch)
        batch_mean = math.fsum(batch) / n
        batch_m2 = math.fsum((value - batch_mean) ** 2 for value in batch)
        batch_mean_abs = math.fsum(abs(value) for value in batch) / n
        total = self._count + n
        delta = batch_mean - self._mean
        self._mean += delta * n / total
        self._m2 += batch_m2 + delta**2 * self._count * n / total
        self._mean_abs += (batch_mean_abs - self._mean_abs) * n / total
        self._count = total

    def state_dict(self) -> dict[str, float]:
        """The merged moments, for a checkpoint."""
        return {
            "count": float(self._count),
            "mean": self._mean,
            "m2": self._m2,
            "mean_abs": self._mean_abs,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the moments saved by ``state_dict``."""
        missing = {"count", "mean", "m2", "mean_abs"} - state.keys()
        if missing:
            raise ValueError(f"RunningMoments state lacks {sorted(missing)}")
        count = state["count"]
        if count < 0 or count != int(count):
            raise ValueError(f"RunningMoments state has an invalid count {count!r}")
        self._count = int(count)
        self._mean = float(state["mean"])
        self._m2 = float(state["m2"])
        self._mean_abs = float(state["mean_abs"])
