"""Rewards for the PPO trainer: fetched from crs in the background, then chosen and scaled.

``RewardFetcher`` owns an event loop in a thread of its own and an ``AsyncRewardClient`` on it,
so that a batch's rewards are on their way while the trainer's thread computes the reference
logprobs and values of the same batch (the overlap). ``select_rewards`` says which number of
crs's answer PPO optimises, and ``RewardScaler`` the explicit factor applied to it. This module
imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from trainer_client.ppo.config import RewardScale, TrainConfig

if TYPE_CHECKING:
    from trainer_client import AsyncRewardClient, RewardResult

T = TypeVar("T")

# crs's names for what to do with a sample without a baseline: "skip" is its "null".
_ON_MISSING = {"error": "error", "raw": "raw", "skip": "null"}
_ON_UNAVAILABLE = {"error": "error", "raw": "raw", "skip": "null"}

# A running std below this is noise, not a scale: dividing by it would blow rewards up.
STD_FLOOR = 1e-6

# The preflight asks once more at most: an unreachable URL should fail in seconds, not after
# the full backoff a running trainer gives a replica that restarts.
_PREFLIGHT_RETRIES = 1
# How often a wait for crs's answer checks that the loop thread is still there to give it.
_LOOP_CHECK_S = 1.0


def contrastive_options(config: TrainConfig) -> dict[str, Any]:
    """The ``contrastive`` object of the trainer's ``POST /v1/rewards`` requests.

    With ``reward=raw`` baselines are still asked for (a missing one is simply null, never an
    error), so that the logs of a raw run show the contrastive reward it did not optimise.
    """
    if config.reward == "raw":
        return {"aggregate": "mean", "on_missing": "null", "on_unavailable": "null"}
    return {
        "aggregate": "mean",
        "on_missing": _ON_MISSING[config.on_missing_baseline],
        "on_unavailable": _ON_UNAVAILABLE[config.on_store_unavailable],
    }


@dataclass(frozen=True, kw_only=True)
class FetchedRewards:
    """One batch's answers from crs, and how long fetching them took (start to answer)."""

    results: list[RewardResult]
    fetch_s: float


def await_result(future: concurrent.futures.Future[T], thread: threading.Thread) -> T:
    """``future.result()``, unless the loop thread that would complete it has stopped: then an
    error saying so instead of a wait that never ends.

    Raises:
        RewardServiceError: the loop thread stopped with the future pending (as ``FetchStopped``),
            or whatever the coroutine raised.
    """
    from trainer_client.client.reward_client import RewardServiceError

    while True:
        try:
            return future.result(timeout=_LOOP_CHECK_S)
        except concurrent.futures.TimeoutError:
            if not thread.is_alive():
                future.cancel()
                raise RewardServiceError(
                    "the trainer's reward fetch loop stopped with a request in flight"
                ) from None


class PendingRewards:
    """A fetch in flight; ``wait`` blocks until its answer (or raises the client's error)."""

    def __init__(
        self, future: concurrent.futures.Future[list[RewardResult]], thread: threading.Thread
    ) -> None:
        self._started = time.monotonic()
        self._done_at: float | None = None
        self._future = future
        self._thread = thread
        future.add_done_callback(self._mark_done)

    def _mark_done(self, _: concurrent.futures.Future[list[RewardResult]]) -> None:
        self._done_at = time.monotonic()

    def wait(self) -> FetchedRewards:
        """The answers, once they are here (an error, not a hang, if the loop thread stopped)."""
        results = await_result(self._future, self._thread)
        done_at = self._done_at if self._done_at is not None else time.monotonic()
        return FetchedRewards(results=results, fetch_s=done_at - self._started)

    def cancel(self) -> None:
        """Give up on the fetch (the trainer is stopping on another error)."""
        self._future.cancel()


class RewardFetcher:
    """An ``AsyncRewardClient`` on an event loop thread of the trainer's (context manager)."""

    def __init__(self, config: TrainConfig) -> None:
        self._config = config
        self._options = contrastive_options(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="crs-ppo-rewards", daemon=True
        )
        self._thread.start()
        self._client: AsyncRewardClient | None = None
        try:
            self._client = self._run(self._build_client(retries=None))
        except BaseException:
            self._stop_loop()
            raise

    async def _build_client(self, *, retries: int | None) -> AsyncRewardClient:
        # Built on the loop, so that its connection pool and semaphore belong to it.
        from trainer_client import AsyncRewardClient, RetryPolicy

        retry = None if retries is None else RetryPolicy(retries=retries)
        return AsyncRewardClient(
            list(self._config.urls),
            token=self._config.token,
            model=self._config.model,
            retry=retry,
        )

    def check_reachable(self) -> None:
        """Ask the service for its models once, before the policy loads.

        Raises:
            RewardServiceError: no replica answered (its message names the URL) or the token
                was refused.
        """

        async def probe() -> None:
            client = await self._build_client(retries=_PREFLIGHT_RETRIES)
            try:
                await client.models()
            finally:
                await client.aclose()

        self._run(probe())

    def start(self, items: Sequence[Mapping[str, Any]]) -> PendingRewards:
        """Send one batch's ``{"prompt", "response", "prompt_id"?}`` items; returns at once."""
        client = self._require_client()
        coroutine = client.score(list(items), contrastive=self._options)
        return PendingRewards(asyncio.run_coroutine_threadsafe(coroutine, self._loop), self._thread)

    def close(self) -> None:
        """Close the connections and stop the loop thread; calling it again does nothing."""
        if self._client is not None:
            client, self._client = self._client, None
            try:
                self._run(client.aclose())
            finally:
                self._stop_loop()

    def _require_client(self) -> AsyncRewardClient:
        if self._client is None:
            raise RuntimeError("the RewardFetcher is closed")
        return self._client

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return await_result(asyncio.run_coroutine_threadsafe(coroutine, self._loop), self._thread)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> RewardFetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def select_rewards(results: Sequence[RewardResult], config: TrainConfig) -> list[float | None]:
    """The reward PPO optimises for each sample, before scaling; None drops the sample.

    ``raw``: crs's ``reward``. ``contrastive``: crs's ``contrastive`` (reward - baseline; the
    reward itself where ``on_missing_baseline``/``on_store_unavailable`` is ``raw``, null where
    it is ``skip``). The contrastive reward is never computed here: crs is the one place that
    knows which baseline belongs to which model version.
    """
    if config.reward == "raw":
        return [result.reward for result in results]
    return [result.contrastive for result in results]


@dataclass(frozen=True, kw_only=True)
class ScaledRewards:
    """One batch's rewards after selection and scaling.

    ``used[i]`` is what sample i is trained on (None: dropped), ``scale`` the factor applied
    (1, 1/std or lambda), ``kept`` the indices of the samples not dropped.
    """

    used: list[float | None]
    scale: float
    kept: list[int]

    @property
    def skipped(self) -> int:
        """How many samples were dropped from this update."""
        return len(self.used) - len(self.kept)


class RewardScaler:
    """The explicit factor on the used rewards (``--reward-scale``), with running statistics.

    none: 1. running-std: 1 / the running std of every used reward so far, this batch included
    (1 while it is below ``STD_FLOOR``). lambda: running mean |raw| / running mean |contrastive|
    over the samples kept so far, clipped to [1, lambda_max]: the contrastive reward is the raw
    one minus a per-prompt baseline, so it is smaller, and lambda gives the reward back its raw
    scale (our reading of the paper; docs/training.md).
    """

    def __init__(self, mode: RewardScale, lambda_max: float) -> None:
        from trainer_client.ppo.algo import RunningMoments

        self.mode = mode
        self.lambda_max = lambda_max
        self.used_moments = RunningMoments()
        self.raw_moments = RunningMoments()
        self.contrastive_moments = RunningMoments()

    def scale(
        self, results: Sequence[RewardResult], selected: Sequence[float | None]
    ) -> ScaledRewards:
        """Update the statistics with this batch's kept samples and apply the factor."""
        pairs = [(index, value) for index, value in enumerate(selected) if value is not None]
        kept = [index for index, _ in pairs]
        kept_values = [value for _, value in pairs]
        factor = self._factor(results, kept, kept_values)
        used = [None if value is None else value * factor for value in selected]
        return ScaledRewards(used=used, scale=factor, kept=kept)

    def _factor(
        self, results: Sequence[RewardResult], kept: Sequence[int], kept_values: Sequence[float]
    ) -> float:
        if self.mode == "running-std":
            self.used_moments.update(kept_values)
            std = self.used_moments.std
            return 1.0 / std if std > STD_FLOOR else 1.0
        if self.mode == "lambda":
            self.raw_moments.update([results[index].reward for index in kept])
            self.contrastive_moments.update(kept_values)
            return lambda_factor(
                self.raw_moments.mean_abs, self.contrastive_moments.mean_abs, self.lambda_max
            )
        return 1.0

    def state_dict(self) -> dict[str, dict[str, float]]:
        """The running statistics, for a checkpoint."""
        return {
            "used": self.used_moments.state_dict(),
            "raw": self.raw_moments.state_dict(),
            "contrastive": self.contrastive_moments.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, dict[str, float]]) -> None:
        """Restore what ``state_dict`` saved."""
        self.used_moments.load_state_dict(dict(state["used"]))
        self.raw_moments.load_state_dict(dict(state["raw"]))
        self.contrastive_moments.load_state_dict(dict(state["contrastive"]))


def lambda_factor(raw_mean_abs: float, contrastive_mean_abs: float, lambda_max: float) -> float:
    """mean |raw| / mean |contrastive| clipped to [1, lambda_max].

    Without any data (both 0) it is 1; contrastive rewards that are all 0 (every response
    equal to its baseline) give lambda_max, the bound, rather than a division by zero.
    """
    if raw_mean_abs <= 0.0:
        return 1.0
    if contrastive_mean_abs <= 0.0:
        return lambda_max
    ratio = raw_mean_abs / contrastive_mean_abs
    if not math.isfinite(ratio):
        return lambda_max
    return min(max(ratio, 1.0), lambda_max)
