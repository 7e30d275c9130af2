"""verl glue: crs rewards as a verl custom reward function.

verl (0.9) loads ``reward.custom_reward_function.name`` from the module at
``reward.custom_reward_function.path``: ``pkg://trainer_client.adapters.verl`` (imported by
name, the form to use) or this file's path (executed as a module of its own, outside
``sys.modules``: nothing at module level here may need to find itself there, which is why
this file has no ``from __future__ import annotations``, under which ``dataclasses`` looks the
module up). verl calls the function once per response with ``data_source, solution_str,
ground_truth, extra_info``, plus ``reward.custom_reward_function.reward_kwargs``. It has no
access to the prompt text, so the dataset carries it in ``extra_info``:

- ``extra_info["prompt"]``: the prompt, a string or chat messages ``[{"role", "content"}]``
  (required; the same prompt the baselines were pushed for, or the same ``prompt_id``);
- ``extra_info["prompt_id"]``: optional, the baselines' prompt id.

``data_source`` and ``ground_truth`` are not used: the reward model judges the response.

Options come from ``reward_kwargs``: ``url`` (else ``$CRS_URL``; a list for replicas, or, in
``$CRS_URL``, a comma-separated string), ``use`` (``contrastive`` | ``raw``), ``aggregate``,
``normalize``, ``on_missing`` (``raw`` | ``error``), ``on_unavailable`` (a number, 0.0 by
default, | ``raw`` | ``error``), ``truncation`` (``left``, the default, | ``none``) and
``max_concurrency`` (requests in flight per worker; verl's reward loop scores every response
of a batch at once, and the service merges concurrent requests into its batches). The bearer
token comes from ``$CRS_API_TOKEN`` only, never from a config file.

``compute_score`` is a coroutine function, for verl's reward loop (which awaits async reward
functions and runs many at once); ``compute_score_sync`` is the same for reward managers that
call it without awaiting. Both return ``{"score", "raw_reward", "baseline"}``; verl takes
``score`` as the reward and logs the others (``baseline`` is NaN where there was none). A
response whose baseline the service could not read (its store failed) scores
``on_unavailable``: 0.0 by default, the neutral contrastive reward (no better than the SFT
baseline), rather than the raw reward, which would shift the PPO reward by the baseline for
the length of the outage; how many did is logged as one warning per burst of concurrent calls
(a batch, in verl's reward loop). A request that fails after the client's retries raises: verl
has no "no reward" value, and a made-up number would train the policy on it.
"""

import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from trainer_client.adapters.common import (
    LoopClients,
    as_prompt,
    check_choice,
    contrastive_options,
    is_unavailable,
    optional_id,
)
from trainer_client.client.reward_client import AsyncRewardClient, RewardClient, Truncation
from trainer_client.client.wire import Item, RewardResult

URL_ENV = "CRS_URL"
TOKEN_ENV = "CRS_API_TOKEN"

# What a response scores when its baseline could not be read: the contrastive reward of a
# response no better than the SFT policy's, which leaves the policy where it is.
NEUTRAL_SCORE = 0.0

log = logging.getLogger("crs.adapters.verl")

# verl calls a plain function, so the clients cannot live in an object of the caller's: they
# are kept here, made on first use, one per event loop (async) or process (sync) and service.
_ASYNC_CLIENTS = LoopClients()
_SYNC_CLIENTS: dict[tuple[Any, ...], RewardClient] = {}
_SYNC_LOCK = threading.Lock()

# on_unavailable: a number to score, or what the service is told to do itself.
OnUnavailable = float | str


@dataclass(frozen=True, kw_only=True)
class VerlOptions:
    """What one call asks of the service, from ``reward_kwargs`` and the environment."""

    urls: tuple[str, ...]
    token: str | None
    use: str = "contrastive"
    aggregate: str = "mean"
    normalize: str = "none"
    on_missing: str = "raw"
    on_unavailable: OnUnavailable = NEUTRAL_SCORE
    # Left: an over-long pair is cut rather than refused, which would stop training.
    truncation: Truncation | None = "left"
    max_concurrency: int = 32

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"no crs URL: set reward_kwargs.url or ${URL_ENV}")
        # verl needs a number for every response: a missing contrastive reward cannot be None.
        check_choice("on_missing", self.on_missing, ("raw", "error"))
        object.__setattr__(self, "on_unavailable", unavailable_score(self.on_unavailable))
        if self.truncation is not None:
            check_choice("truncation", self.truncation, ("none", "left"))
        contrastive_options(self.use, self.aggregate, self.normalize, self.on_missing, "null")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "VerlOptions":
        """Options from a call's keyword arguments; keys verl adds itself are ignored."""
        return cls(
            urls=tuple(replicas(kwargs.get("url") or os.environ.get(URL_ENV, ""))),
            token=os.environ.get(TOKEN_ENV) or None,
            **{key: kwargs[key] for key in _OPTION_KEYS if kwargs.get(key) is not None},
        )

    @property
    def client_key(self) -> tuple[Any, ...]:
        """What tells one service connection from another: calls that agree share a client."""
        return (self.urls, self.token, self.max_concurrency)

    @property
    def client_args(self) -> dict[str, Any]:
        """Keyword arguments of the client for these options."""
        return {
            "urls": list(self.urls),
            "token": self.token,
            "max_concurrency": self.max_concurrency,
        }

    @property
    def contrastive(self) -> dict[str, str] | None:
        """The request's ``contrastive`` field. A number for ``on_unavailable`` is asked as
        ``null`` and put in here, so that the service never decides it."""
        wire = "null" if isinstance(self.on_unavailable, float) else self.on_unavailable
        return contrastive_options(self.use, self.aggregate, self.normalize, self.on_missing, wire)


_OPTION_KEYS = (
    "use",
    "aggregate",
    "normalize",
    "on_missing",
    "on_unavailable",
    "truncation",
    "max_concurrency",
)


def unavailable_score(value: Any) -> OnUnavailable:
    """``on_unavailable`` as given in ``reward_kwargs``: a finite number (a YAML or Hydra
    number, or its text), ``raw`` or ``error``. ``null`` is refused: verl needs a number."""
    if isinstance(value, str) and value in ("raw", "error"):
        return value
    if isinstance(value, bool):  # a bool is an int to Python, and a slip in a config
        raise ValueError(f"on_unavailable must be a number, raw or error; got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"on_unavailable must be a number, raw or error; got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"on_unavailable must be a finite number; got {value!r}")
    return number


def replicas(url: str | Sequence[str]) -> list[str]:
    """The base URLs in ``url``: one URL, a comma-separated string of them, or a list."""
    urls = url.split(",") if isinstance(url, str) else list(url)
    return [u.strip() for u in urls if u.strip()]


async def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """The crs reward of ``solution_str`` for the prompt in ``extra_info`` (verl reward loop).

    Returns:
        ``{"score": contrastive or raw reward, "raw_reward": ..., "baseline": ... or NaN}``;
        ``score`` is ``on_unavailable`` (0.0 by default) where the baseline store failed.

    Raises:
        ValueError: no prompt in ``extra_info``, no URL, or an unknown option.
        RewardServiceError: the service refused, or could not be reached after retries.
    """
    options = VerlOptions.from_kwargs(kwargs)
    item = item_of(solution_str, extra_info)
    client = _ASYNC_CLIENTS.get(
        options.client_key, lambda: AsyncRewardClient(**options.client_args)
    )
    with OUTAGES.call(options.on_unavailable) as outcome:
        [result] = await client.score([item], options.contrastive, options.truncation)
        outcome.unavailable = is_unavailable(result)
    return score_of(result, options)


def compute_score_sync(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """``compute_score`` for reward managers that call it without awaiting (a coroutine
    function there gives a coroutine, not a score)."""
    options = VerlOptions.from_kwargs(kwargs)
    item = item_of(solution_str, extra_info)
    with OUTAGES.call(options.on_unavailable) as outcome:
        [result] = _sync_client(options).score([item], options.contrastive, options.truncation)
        outcome.unavailable = is_unavailable(result)
    return score_of(result, options)


class _Outcome:
    """What one call found out: whether its baseline was unavailable."""

    __slots__ = ("unavailable",)

    def __init__(self) -> None:
        self.unavailable = False


class OutageTally:
    """Counts the responses scored without their baseline (the store failed) and warns once
    per burst of concurrent calls, with how many: verl's reward loop scores a batch's
    responses at once, so a burst is a batch, and one line per batch says how much of it
    was scored ``on_unavailable`` without a line per response. Thread-safe: the sync
    function runs in verl's executor threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._scored = 0
        self._unavailable: dict[str, int] = {}

    @contextmanager
    def call(self, on_unavailable: OnUnavailable) -> Iterator[_Outcome]:
        """A context for one call: set ``unavailable`` on what it yields once scored."""
        outcome = _Outcome()
        with self._lock:
            self._in_flight += 1
        try:
            yield outcome
        except BaseException:
            self._leave(None, on_unavailable)  # a failed call scored nothing
            raise
        self._leave(outcome, on_unavailable)

    def _leave(self, outcome: _Outcome | None, on_unavailable: OnUnavailable) -> None:
        with self._lock:
            self._in_flight -= 1
            if outcome is not None:
                self._scored += 1
                if outcome.unavailable:
                    how = describe(on_unavailable)
                    self._unavailable[how] = self._unavailable.get(how, 0) + 1
            if self._in_flight:
                return
            scored, unavailable = self._scored, self._unavailable
            self._scored, self._unavailable = 0, {}
        for how, count in unavailable.items():
            log.warning(
                "crs baseline store unavailable for %d of %d responses: scored %s",
                count,
                scored,
                how,
            )


def describe(on_unavailable: OnUnavailable) -> str:
    """How a response without its baseline was scored, for the warning."""
    if isinstance(on_unavailable, float):
        return f"{on_unavailable} (on_unavailable)"
    return "their raw reward (on_unavailable: raw)"


OUTAGES = OutageTally()


async def aclose_clients() -> None:
    """Close the clients ``compute_score`` made on the running event loop (e.g. at the end of
    a run; verl itself never closes them, and a process exit does as well)."""
    await _ASYNC_CLIENTS.aclose()


def close_sync_clients() -> None:
    """Close the clients ``compute_score_sync`` made in this process."""
    with _SYNC_LOCK:
        clients = [c for key, c in _SYNC_CLIENTS.items() if key[0] == os.getpid()]
        _SYNC_CLIENTS.clear()
    for client in clients:
        client.close()


def item_of(solution_str: str, extra_info: Mapping[str, Any] | None) -> Item:
    """The item to score: the prompt (and prompt id) from ``extra_info``, the response."""
    if not extra_info or extra_info.get("prompt") is None:
        raise ValueError(
            'crs needs the prompt: put it in the dataset\'s extra_info["prompt"] '
            "(a string or chat messages)"
        )
    return Item(
        prompt=as_prompt(extra_info["prompt"]),
        response=solution_str,
        prompt_id=optional_id(extra_info.get("prompt_id")),
    )


def score_of(result: RewardResult, options: VerlOptions) -> dict[str, float]:
    """verl's result dict; NaN stands for "no baseline" (verl stacks these into arrays).

    Raises:
        ValueError: the service gave no contrastive reward where the options ask for one.
    """
    score = result.reward if options.use == "raw" else result.contrastive
    if score is None and is_unavailable(result) and isinstance(options.on_unavailable, float):
        score = options.on_unavailable
    if score is None:  # not under on_missing raw or error, which VerlOptions insists on
        raise ValueError(f"the service gave no contrastive reward ({result.baseline_source})")
    baseline = math.nan if result.baseline is None else result.baseline
    return {"score": score, "raw_reward": result.reward, "baseline": baseline}


def _sync_client(options: VerlOptions) -> RewardClient:
    # Keyed by process id too: a client's thread does not survive a fork into a worker pool.
    key = (os.getpid(), *options.client_key)
    with _SYNC_LOCK:
        client = _SYNC_CLIENTS.get(key)
        if client is None:
            client = _SYNC_CLIENTS[key] = RewardClient(**options.client_args)
        return client
