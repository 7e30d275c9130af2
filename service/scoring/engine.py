"""The engine: an async facade over a reward model that the API awaits.

Tokenisation runs in a small thread pool, batches form in the shared batcher, and the forward
runs in the batcher's device threads (one on a GPU), so the event loop only ever waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol

from service.scoring.batcher import Batcher, BatchObserver, DeviceHealth
from service.scoring.formatting import input_chars
from service.scoring.model import Identified, RewardModel, identify_model, load_reward_model
from service.scoring.types import (
    Encoded,
    ModelInfo,
    ModelLoadError,
    NonFiniteReward,
    RewardInput,
    Score,
)
from service.settings import Settings, Truncation

log = logging.getLogger("crs.engine")

EngineState = Literal["loading", "ready", "failed", "stopped"]
# The first forward may compile kernels or initialise CUDA: not bound by the request limit.
WARM_UP_TIMEOUT_S = 600.0
WARM_UP_ITEM = RewardInput(prompt="How are you?", response="Fine, thank you.")
# A request with more text than this (about 256 KB: a few hundred ordinary items) is tokenised
# in the bulk pool. Each item's work is bounded (Formatter.max_chars), not a request's.
BULK_REQUEST_CHARS = 256 * 1024


class EngineNotReady(RuntimeError):
    """Scoring was asked of an engine whose model is not loaded (yet, or any more)."""


class RewardEngine(Protocol):
    """What the API needs of a scoring engine; tests may supply a fake one."""

    @property
    def state(self) -> EngineState: ...

    @property
    def info(self) -> ModelInfo | None: ...

    @property
    def load_error(self) -> str | None: ...

    @property
    def device_health(self) -> DeviceHealth:
        """The device threads scoring runs on: started, alive, died (none before start)."""
        ...

    async def aidentify(self) -> ModelInfo:
        """What the engine will serve (name, version, ...) from the model's files, before any
        weights are loaded; raises ``ModelLoadError`` for a directory that cannot serve."""

    async def astart(self, *, full_warm_up: bool = False) -> None:
        """Load and warm the model; returns when ready, raises when the load failed. With
        ``full_warm_up`` the warm-up includes a batch of the full token budget, so a model
        that cannot run one fails here (a hot swap) rather than on the first big request."""

    async def astop(self) -> None:
        """Release threads and the model."""

    async def score(self, items: Sequence[RewardInput], *, truncation: Truncation) -> list[Score]:
        """Raw rewards of the items, in order."""


class HFRewardEngine:
    """Scores with a Hugging Face sequence classifier, batching items across requests."""

    def __init__(self, model_path: Path, settings: Settings, observer: BatchObserver) -> None:
        self._model_path = model_path
        self._settings = settings
        self._observer = observer
        self._model: RewardModel | None = None
        self._identified: Identified | None = None
        self._batcher: Batcher | None = None
        self._state: EngineState = "loading"
        self._load_error: str | None = None
        # Fast tokenizers release the GIL: tokenising runs beside the loop and the device.
        self._tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="crs-tokenize")
        # Requests carrying more than BULK_REQUEST_CHARS of text are tokenised here, one at a
        # time, so that big ones can never hold the threads that small requests use.
        self._bulk_tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="crs-tokenize-bulk")
        # Loading and warm-up run here; from then on the batcher's thread owns the device.
        self._load_pool = ThreadPoolExecutor(1, thread_name_prefix="crs-load")

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def info(self) -> ModelInfo | None:
        return self._model.info if self._model else None

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def device_health(self) -> DeviceHealth:
        batcher = self._batcher
        return batcher.device_health if batcher else DeviceHealth(started=0, alive=0, died=0)

    async def aidentify(self) -> ModelInfo:
        if self._identified is None:
            self._identified = await asyncio.get_running_loop().run_in_executor(
                self._load_pool, identify_model, self._model_path, self._settings
            )
        return self._identified.info

    def _load(self, full_warm_up: bool) -> RewardModel:
        """On the load thread: the model, and with ``full_warm_up`` one full-size forward."""
        model = load_reward_model(self._model_path, self._settings, self._identified)
        if full_warm_up:
            check_full_batch(model, self._settings.max_batch_tokens)
        return model

    async def astart(self, *, full_warm_up: bool = False) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.aidentify()
            model = await loop.run_in_executor(self._load_pool, self._load, full_warm_up)
            batcher = self._new_batcher(model)
            batcher.start()
            self._model, self._batcher = model, batcher
            # The first forward pays for lazy initialisation on the device thread; do it
            # through the real path before saying ready.
            warm_up = model.formatter.encode([WARM_UP_ITEM], "left")
            rewards = await batcher.submit(warm_up, WARM_UP_TIMEOUT_S)
            if not all(map(math.isfinite, rewards)):
                raise ModelLoadError(f"the warm-up batch gave a non-finite reward: {rewards}")
        except Exception as exc:
            self._state = "failed"
            self._load_error = str(exc)
            if self._batcher is not None:
                await self._batcher.stop()
            self._model, self._batcher = None, None
            release_memory()
            raise
        self._state = "ready"
        normalization = model.normalization
        log.info(
            "model %s ready on %s x%d (%s, %s input, max %d tokens, %s)",
            model.info.version,
            model.info.device,
            model.workers.workers,
            model.info.dtype,
            model.info.input_format,
            model.info.max_input_tokens,
            "rewards as logits"
            if normalization is None
            else f"rewards normalised as OpenRLHF: (logit - {normalization.mean:g}) / "
            f"{normalization.std:g}",
        )

    def _tokenize_pool_for(self, items: Sequence[RewardInput]) -> ThreadPoolExecutor:
        """The bulk pool for requests with much text, the shared one for the rest."""
        if input_chars(items) > BULK_REQUEST_CHARS:
            return self._bulk_tokenize_pool
        return self._tokenize_pool

    def _new_batcher(self, model: RewardModel) -> Batcher:
        return Batcher(
            forward=model.forward,
            max_batch_tokens=self._settings.max_batch_tokens,
            max_queue_tokens=self._settings.max_queue_tokens,
            batch_wait_s=self._settings.batch_wait_ms / 1000,
            min_efficiency=self._settings.min_batch_efficiency,
            observer=self._observer,
            workers=model.workers.workers,
            worker_init=model.bind_worker_thread,
            group_prefixes=model.batches_by_prompt,
            computed_tokens=model.computed_tokens,
        )

    async def astop(self) -> None:
        self._state = "stopped"
        if self._batcher is not None:
            await self._batcher.stop()
        self._model, self._batcher, self._identified = None, None, None
        release_memory()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._bulk_tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)

    async def score(self, items: Sequence[RewardInput], *, truncation: Truncation) -> list[Score]:
        model, batcher = self._model, self._batcher
        if model is None or batcher is None or self._state != "ready":
            raise EngineNotReady(f"model is {self._state}")
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool_for(items), model.formatter.encode, items, truncation
            )
        except asyncio.CancelledError:
            # Gone before queueing (client disconnected): count them as the batcher would.
            self._observer.items_dropped("cancelled", len(items))
            raise
        rewards = await batcher.submit(encoded, self._settings.request_timeout_s)
        if bad := [index for index, reward in enumerate(rewards) if not math.isfinite(reward)]:
            raise NonFiniteReward(bad)
        return [
            Score(reward=reward, tokens=item.length, truncated=item.truncated)
            for reward, item in zip(rewards, encoded, strict=True)
        ]


def full_batch(model: RewardModel, max_batch_tokens: int) -> list[Encoded]:
    """The largest batch the batcher may form: items of the longest input the model takes
    (or the whole budget when that is shorter), as many as the token budget holds."""
    length = max(1, min(model.info.max_input_tokens, max_batch_tokens))
    [sample] = model.formatter.encode([WARM_UP_ITEM], "left")
    ids = (sample.input_ids * (length // max(1, sample.length) + 1))[:length]
    types = None if sample.token_type_ids is None else [0] * length
    item = Encoded(input_ids=ids, token_type_ids=types, truncated=False)
    return [item] * max(1, max_batch_tokens // length)


def check_full_batch(model: RewardModel, max_batch_tokens: int) -> None:
    """One forward of a full-size batch; an out-of-memory or non-finite result fails the load
    with what to change."""
    batch = full_batch(model, max_batch_tokens)
    try:
        rewards = model.forward(batch)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        raise ModelLoadError(
            f"a full-size batch ({len(batch)} x {batch[0].length} tokens, CRS_MAX_BATCH_TOKENS="
            f"{max_batch_tokens}) failed: {exc}; lower CRS_MAX_BATCH_TOKENS or free device memory"
        ) from exc
    if not all(map(math.isfinite, rewards)):
        raise ModelLoadError("a full-size warm-up batch gave non-finite rewards")


def release_memory() -> None:
    """Give an unloaded model's memory back: collect its cycles, return CUDA's cached blocks
    and glibc's free heap pages to the system."""
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
