"""TRL glue: crs rewards as a reward function for ``GRPOTrainer`` (and TRL's other trainers
that take ``reward_funcs``).

    from trainer_client.adapters.trl import contrastive_reward_func

    trainer = GRPOTrainer(model=..., reward_funcs=[contrastive_reward_func("http://rm-0:8000")],
                          args=GRPOConfig(...), train_dataset=dataset)

The function is a coroutine function: TRL (1.x) runs ``async`` reward functions on an event
loop of its own in a daemon thread, concurrently with its other async reward functions, so
the HTTP round trip does not hold up the others. The reward client is made lazily on that
loop, the first time the function runs, and reused for every later step. TRL logs the rewards
under the function's ``__name__`` (``rewards/crs_contrastive/mean`` by default).

A completion gets None, which TRL leaves out of its reward and advantage computation, when no
reward could be had: no baseline for its prompt under ``on_missing="null"``, a baseline store
that failed under ``on_unavailable="null"`` (the default; counted in a warning), or a request
that failed after the client's retries (logged as a warning). Refusals that would fail every step
alike (a bad token, a conflict) are raised instead, so that a run does not go on training
without rewards. An empty completion is sent as it is: the service scores it (its rendering
still has the template's tokens), so that a policy learns what saying nothing is worth.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from trainer_client.adapters.common import (
    LoopClients,
    Normalize,
    OnMissing,
    OnUnavailable,
    Use,
    as_prompt,
    contrastive_options,
    is_fatal,
    is_unavailable,
    optional_id,
    text_of,
)
from trainer_client.client.reward_client import AsyncRewardClient, RewardServiceError, Truncation
from trainer_client.client.wire import Item, RewardResult

log = logging.getLogger("crs.adapters.trl")

RewardFunc = Callable[..., Awaitable[list[float | None]]]


def contrastive_reward_func(
    url: str | Sequence[str] | None = None,
    *,
    token: str | None = None,
    aggregate: str = "mean",
    normalize: Normalize = "none",
    on_missing: OnMissing = "raw",
    on_unavailable: OnUnavailable = "null",
    use: Use = "contrastive",
    truncation: Truncation | None = "left",
    name: str | None = None,
    client: AsyncRewardClient | None = None,
    **client_options: Any,
) -> RewardFunc:
    """A TRL reward function ``async (prompts, completions, **kwargs) -> list[float | None]``
    that scores each completion on crs.

    Args:
        url: the service's base URL, or several replicas'. Leave out when ``client`` is given.
        token: bearer token (``CRS_API_TOKENS`` on the service).
        aggregate: how a prompt's baseline rewards make its baseline: ``mean`` (the paper's),
            ``median``, ``min``, ``max`` or ``quantile:<q>``.
        normalize: ``none``, or ``std`` to divide by the baseline rewards' spread.
        on_missing: for a prompt without baseline: ``raw`` (its raw reward), ``null`` (None:
            TRL skips the completion) or ``error`` (the request fails, and this raises).
        on_unavailable: for a prompt whose baseline the service could not read (its store
            failed): ``null`` (None, the default: TRL skips the completion rather than train
            on a reward shifted by the missing baseline), ``raw`` (its raw reward) or
            ``error`` (the service answers 503; after the client's retries, every
            completion of the call gets None).
        use: ``contrastive`` (reward minus baseline) or ``raw`` (the reward model's score;
            baselines are not looked up).
        truncation: ``left`` (default) cuts an over-long pair from the left, so that one
            long completion cannot cost the whole batch its rewards (the service refuses a
            request with an over-long item under ``none``); None: the service's setting.
        name: the function's ``__name__``, under which TRL logs it; default ``crs_<use>``.
        client: a client of your own (used on TRL's reward loop only); by default one is made
            from ``url``, ``token`` and ``client_options`` on first use.
        **client_options: passed to ``AsyncRewardClient`` (``retry``, ``timeout``,
            ``chunk_size``, ``max_concurrency``, ``model_version``, ``on_version_change``).

    Raises:
        ValueError: an unknown option, or both or neither of ``url`` and ``client``.
    """
    contrastive = contrastive_options(use, aggregate, normalize, on_missing, on_unavailable)
    client_for_loop = _client_source(url, token, client, client_options)

    async def reward_func(
        prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        items = to_items(prompts, completions, kwargs.get("prompt_id"))
        try:
            results = await client_for_loop().score(items, contrastive, truncation)
        except RewardServiceError as error:
            if is_fatal(error):
                raise
            log.warning("no crs rewards for %d completions: %s", len(items), error)
            return [None] * len(items)
        if use == "contrastive":
            log_baseline_coverage(kwargs.get("log_metric"), reward_func.__name__, results)
            log_unavailable(results, on_unavailable)
        return [reward_of(result, use) for result in results]

    reward_func.__name__ = reward_func.__qualname__ = name or f"crs_{use}"
    return reward_func


def log_baseline_coverage(
    log_metric: Callable[[str, float], None] | None, name: str, results: Sequence[RewardResult]
) -> None:
    """Log ``<name>/baseline_found``, the share of completions whose prompt had a baseline,
    through TRL's ``log_metric`` keyword (recent TRL versions pass it; without it, nothing).
    A falling share means the dataset's prompts and the pushed baselines do not match."""
    if log_metric is None or not results:
        return
    found = sum(result.baseline is not None for result in results)
    log_metric(f"{name}/baseline_found", found / len(results))


def log_unavailable(results: Sequence[RewardResult], on_unavailable: str) -> None:
    """Warn, once per call, how many completions had no baseline because the store failed."""
    unavailable = sum(map(is_unavailable, results))
    if unavailable:
        scored = "None (skipped by TRL)" if on_unavailable == "null" else "their raw reward"
        log.warning(
            "crs baseline store unavailable for %d of %d completions: rewarded %s",
            unavailable,
            len(results),
            scored,
        )


def to_items(
    prompts: Sequence[Any], completions: Sequence[Any], prompt_ids: Sequence[Any] | None = None
) -> list[Item]:
    """The items to score, one per completion, in order.

    Prompts are strings or chat messages; a conversational completion is a list of messages,
    of which the last one's content is the response (TRL gives a single assistant message).
    ``prompt_ids`` is the dataset's ``prompt_id`` column, as TRL passes it (None: no column).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    ids = list(prompt_ids) if prompt_ids is not None else [None] * len(prompts)
    if len(ids) != len(prompts):
        raise ValueError(f"{len(ids)} prompt ids for {len(prompts)} prompts")
    return [
        Item(
            prompt=as_prompt(prompt),
            response=completion_text(completion),
            prompt_id=optional_id(given_id),
        )
        for prompt, completion, given_id in zip(prompts, completions, ids, strict=True)
    ]


def completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the content of its last message."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    return text_of(completion[-1].get("content"))


def reward_of(result: RewardResult, use: str) -> float | None:
    """The number TRL gets for one result: the contrastive reward (None when the service gave
    none) or the raw reward."""
    return result.reward if use == "raw" else result.contrastive


def _client_source(
    url: str | Sequence[str] | None,
    token: str | None,
    client: AsyncRewardClient | None,
    client_options: dict[str, Any],
) -> Callable[[], AsyncRewardClient]:
    """How the reward function gets its client: the one given, or one per event loop."""
    if client is not None:
        if url is not None or token is not None or client_options:
            raise ValueError("give either client or url (with token and client options)")
        return lambda: client
    if url is None:
        raise ValueError("give the service's url, or a client")
    # A misspelt option fails here, not at the first training step.
    inspect.signature(AsyncRewardClient).bind(url, token=token, **client_options)
    # Made on first use, on the loop TRL calls the function on: a client is bound to one loop.
    clients = LoopClients()
    return lambda: clients.get(None, lambda: AsyncRewardClient(url, token=token, **client_options))
