"""The arithmetic of contrastive rewards: a baseline from k stored rewards, and the reward
relative to it (DESIGN.md 1: ``r_cr(x, y) = r(x, y) - b(x)``, b the mean by default)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Normalize = Literal["none", "std"]


@dataclass(frozen=True, slots=True)
class BaselineStats:
    """Summary of one prompt's baseline rewards."""

    n: int
    mean: float
    std: float  # population standard deviation (the k samples are the whole baseline)
    min: float
    max: float

    @classmethod
    def of(cls, rewards: Sequence[float]) -> BaselineStats:
        if not rewards:
            raise ValueError("a baseline needs at least one reward")
        return cls(
            n=len(rewards),
            mean=statistics.fmean(rewards),
            std=statistics.pstdev(rewards),
            min=min(rewards),
            max=max(rewards),
        )


def aggregate(rewards: Sequence[float], how: str) -> float:
    """``mean`` | ``median`` | ``min`` | ``max`` | ``quantile:<q>`` (linear interpolation between
    order statistics, as numpy's default) of a non-empty list."""
    if not rewards:
        raise ValueError("a baseline needs at least one reward")
    if how == "mean":
        return statistics.fmean(rewards)
    if how == "median":
        return statistics.median(rewards)
    if how == "min":
        return min(rewards)
    if how == "max":
        return max(rewards)
    if how.startswith("quantile:"):
        return quantile(rewards, float(how.removeprefix("quantile:")))
    raise ValueError(f"unknown aggregate {how!r}")


def quantile(rewards: Sequence[float], q: float) -> float:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    ordered = sorted(rewards)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def contrastive(
    reward: float, baseline: float, std: float, normalize: Normalize, std_floor: float
) -> float:
    """The reward over its prompt's baseline; with ``std``, in units of the baseline's spread,
    never dividing by less than ``std_floor`` (k equal samples have zero spread)."""
    difference = reward - baseline
    if normalize == "std":
        return difference / max(std, std_floor)
    return difference
