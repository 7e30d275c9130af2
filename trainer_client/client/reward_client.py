"""``RewardClient`` and ``AsyncRewardClient``: rewards and baselines over HTTP (DESIGN.md 6).

The logic lives once, in ``AsyncRewardClient``. ``RewardClient`` runs one on an event loop of
its own in a background thread and waits for each call's result, so it behaves the same
whether it is called from plain code or from a thread that is already running an event loop
(TRL calls reward functions synchronously from inside one); ``asyncio.run`` would fail there.

Large inputs go out as requests of ``chunk_size`` items, at most ``max_concurrency`` in flight,
and come back in input order. Each request is retried under a ``RetryPolicy`` (429, 503, 504,
connection failures and timeouts; never another 4xx, nor 507 store_full) on the next replica in
turn; a replica that refused a connection or answered 503 is skipped for
``RetryPolicy.replica_cooldown_s``. Every request is safe to repeat: scoring only reads, a
replace stores the same thing again, and each baseline item carries an ``upload_id`` that the
service applies once, so an append whose answer was lost is not stored twice by its retry.

One ``score`` call gives rewards of one model version, even while replicas serve different
ones during a rollout: its first request goes unpinned and the others are pinned (with
``"model_version"``) to the version that answered it. A replica that does not serve that
version (409 ``version_not_loaded``, or an answer of another version) is passed over for the
rest of the call; when no replica serves it any more, the whole call is scored once more,
unpinned. Across calls the client does not go back: once it has seen the version change, later
calls are pinned to the new one for as long as some replica serves it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from trainer_client.client.replicas import REPLICA_DOWN_STATUSES, Replicas, replica_down
from trainer_client.client.retry import RetryPolicy, parse_retry_after
from trainer_client.client.wire import (
    BaselineItem,
    BaselinesPushResult,
    BaselinesPutAnswer,
    BaselineStored,
    Item,
    ModelsInfo,
    OpenRLHFRewards,
    RewardResult,
    RewardsAnswer,
)
from trainer_client.prompt_id import prompt_id

log = logging.getLogger("crs.client")

T = TypeVar("T")
Answer = TypeVar("Answer", bound=BaseModel)
Input = TypeVar("Input", Item, BaselineItem)

Truncation = Literal["none", "left"]
Mode = Literal["replace", "append"]
VersionHook = Callable[[str | None, str], None]

# The 409 of a request pinned to a version the replica does not serve: its ``type``, or a
# ``conflict`` saying so in ``details.reason``; services before model management answered a
# ``conflict`` naming the version in ``details.requested``.
VERSION_NOT_LOADED = "version_not_loaded"

# Sent as ``"contrastive": {}``: the service's defaults (mean, none, null). None skips baselines.
SERVER_DEFAULTS: Mapping[str, Any] = MappingProxyType({})

# Reads wait past the service's own 120 s request timeout, so that a slow request ends as its
# 504 (retried) rather than as a client timeout; connecting to a live server is quick.
DEFAULT_TIMEOUT = httpx.Timeout(180.0, connect=5.0)


class RewardServiceError(Exception):
    """A request the service refused, or that could not reach it, after any retries.

    Attributes:
        status: the HTTP status; None when no answer came (connection failure, timeout).
        error_type: the envelope's ``type`` (``validation_error``, ``conflict``, ...), or
            ``unreachable`` without an answer, ``http_error`` for an answer not in the envelope
            (a proxy's), ``bad_answer`` for a body the client cannot read.
        message: the envelope's ``message``.
        details: the envelope's ``details`` (for a 422, the bad fields).
        url: the URL of the request that failed last.
        replica: the base URL of the replica that answered it (None without a request).
        offset: the index, in the items given, of the failed request's first item; indices
            in ``details`` count from it. None for requests without items.
        retries: how many retries came before giving up.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str = "error",
        details: Any = None,
        url: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.details = details
        self.url = url
        self.replica: str | None = None
        self.offset = offset
        self.retries = 0

    @classmethod
    def from_response(
        cls, response: httpx.Response, *, offset: int | None = None
    ) -> RewardServiceError:
        """The error an answer carries in the envelope ``{"error": {type, message, details}}``."""
        error_type, message, details = _envelope(response)
        return cls(
            message,
            status=response.status_code,
            error_type=error_type,
            details=details,
            url=str(response.request.url),
            offset=offset,
        )

    def __str__(self) -> str:
        answer = f"HTTP {self.status} {self.error_type}" if self.status else self.error_type
        where = f" from {self.url}" if self.url else ""
        gave_up = f" (gave up after {self.retries} retries)" if self.retries else ""
        return f"{answer}{where}: {self.message}{gave_up}"


class EndpointNotFound(RewardServiceError):
    """The service does not have this endpoint: it is older than the client."""


def _envelope(response: httpx.Response) -> tuple[str, str, Any]:
    try:
        error = response.json()["error"]
        return str(error["type"]), str(error["message"]), error.get("details")
    except (ValueError, KeyError, TypeError):
        # Not the service's envelope: a proxy or load balancer answered in its own format.
        return "http_error", response.text[:200] or response.reason_phrase, None


@dataclass(frozen=True, kw_only=True)
class _Failure:
    """Why one try failed, and what that says about the next one."""

    error: RewardServiceError
    replica: str
    retryable: bool
    replica_down: bool
    retry_after_s: float | None = None
    cause: Exception | None = None


class _VersionGone(Exception):
    """No replica serves the model version a request is pinned to (any more)."""

    def __init__(self, version: str, refusal: RewardServiceError) -> None:
        super().__init__(f"no replica serves model version {version}")
        self.version = version
        self.refusal = refusal


@dataclass
class _Refusals:
    """The replicas found, during one call, not to serve the version it is pinned to: every
    chunk of the call passes them over. ``latest`` is the latest refusal, raised when every
    replica refuses."""

    replicas: set[str] = field(default_factory=set)
    latest: RewardServiceError | None = None

    def add(self, replica: str, refusal: RewardServiceError) -> None:
        self.replicas.add(replica)
        self.latest = refusal


@dataclass(frozen=True, kw_only=True)
class _Scored:
    """The results of one request, or of a whole call, and the version that scored them.
    ``replaced``: the version the call was pinned to first, when no replica served it."""

    results: list[RewardResult]
    version: str
    replaced: str | None = None


class AsyncRewardClient:
    """Scores items and uploads baselines on one or more crs replicas; every method is a
    coroutine. Use it on one event loop, and close it (``aclose`` or ``async with``).

    Args:
        urls: a base URL or several (replicas, taken in turn), e.g. ``http://rm-0:8000``.
        token: bearer token for ``CRS_API_TOKENS``.
        timeout: per request; default ``DEFAULT_TIMEOUT``.
        retry: retries, backoff and replica cool-down; default ``RetryPolicy()``.
        chunk_size: items per request (for baselines: responses per request, whole prompts).
        max_concurrency: requests in flight at once, over all calls on this client.
        model: the name of the reward model to use, where the service serves several; None:
            the service's default one.
        model_version: pin; every request names it, a replica that does not serve it is passed
            over, and a 409 ``version_not_loaded`` is raised when none does. It is never
            replaced by another version.
        on_version_change: called as ``hook(old, new)`` once per change of the model version
            the client's calls get (the first one counts as a change from None), never for a
            replica still answering with a version the client has moved on from. It runs on
            the client's event loop (for ``RewardClient``, its background thread); an exception
            it raises fails the call that saw the change.
        transport: an httpx transport to send requests through (default: httpx's own, over
            the network); for example ``httpx.MockTransport`` in a test.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        chunk_size: int = 256,
        max_concurrency: int = 8,
        model: str | None = None,
        model_version: str | None = None,
        on_version_change: VersionHook | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if model is not None and not model:
            raise ValueError("model must be a non-empty name or None")
        self.retry = retry or RetryPolicy()
        self.replicas = Replicas(
            [urls] if isinstance(urls, str) else list(urls), self.retry.replica_cooldown_s
        )
        self.chunk_size = chunk_size
        self.max_concurrency = max_concurrency
        self.model = model
        self.model_version = model_version
        self.on_version_change = on_version_change
        self._seen_version: str | None = None
        # Versions the client moved on from: a replica still answering one is behind, and no
        # change is reported for it.
        self._left_versions: set[str] = set()
        # Versions that answered as draining: the replica activated another one since.
        self._retiring: set[str] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Keep-alive for every slot on every replica: round robin would churn connections.
        keepalive = max_concurrency * len(self.replicas.urls)
        self._http = httpx.AsyncClient(
            timeout=timeout or DEFAULT_TIMEOUT,
            headers=headers,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive),
            transport=transport,
        )

    @property
    def seen_model_version(self) -> str | None:
        """The model version the client's calls get now: that of the latest call (None before
        the first), and once it has changed, the one later calls are pinned to."""
        return self._seen_version

    async def score(
        self,
        items: Iterable[Item | Mapping[str, Any]],
        contrastive: Mapping[str, Any] | None = SERVER_DEFAULTS,
        truncation: Truncation | None = None,
    ) -> list[RewardResult]:
        """Rewards of ``items`` (``Item`` or ``{"prompt", "response", "prompt_id"?}``), in order.

        Args:
            items: the pairs to score; an empty one sends nothing.
            contrastive: ``{"aggregate", "normalize", "on_missing"}`` (missing keys take the
                service's defaults), or None to skip baselines.
            truncation: ``none`` (over-long items are a 422) or ``left``; None: the service's.

        Every result has the same ``model_version`` (see the module's docstring for how).

        Raises:
            ValueError: an item is not of the expected shape (named by its index).
            RewardServiceError: a request refused, or retries ran out; nothing is returned.
                With ``model_version`` set: 409 ``version_not_loaded`` when no replica serves
                it. Without: the same when the version vanished from every replica in the
                middle of the call twice.
        """
        bodies = _to_json(items, Item)
        if not bodies:
            return []
        options = self._reward_options(contrastive, truncation)
        if self.model_version is not None:
            scored = await self._score_pinned_by_user(bodies, options, self.model_version)
            self._saw_version(scored.version, settled=True)
        else:
            scored = await self._score_on_one_version(bodies, options)
            # A version the client moved on from is taken back only where the one it follows
            # left every replica (a rollback everywhere), not from a call begun before the move.
            settled = scored.replaced is not None and scored.replaced == self._seen_version
            self._saw_version(scored.version, settled=settled)
        return scored.results

    async def push_baselines(
        self, items: Iterable[BaselineItem | Mapping[str, Any]], mode: Mode = "replace"
    ) -> BaselinesPushResult:
        """Score and store each prompt's baseline responses (``PUT /v1/baselines``).

        Each item carries an ``upload_id`` (a new random one unless the item names its own),
        sent again unchanged on every retry: the service applies an append of that id to that
        prompt once, so both modes are retried like scoring, a read timeout or a 504 after the
        append landed included (the retry answers ``stored=True, duplicate=True``). To make a
        re-run of the whole call safe as well, give ids derived from the content, as
        ``push-baselines`` does. Prompts the store could not keep come back with
        ``stored=False``, a reason and an ``error_type``.

        Returns:
            Totals, and per prompt, in order, its statistics and whether it was stored.

        Raises:
            ValueError: a malformed item, or one prompt given twice (the requests run
                concurrently, so which one would win is undefined).
            RewardServiceError: a request refused, or retries ran out.
        """
        if mode not in ("replace", "append"):
            raise ValueError(f"mode must be replace or append, got {mode!r}")
        bodies = _with_upload_ids(_to_json(items, BaselineItem))
        ids = _unique_prompt_ids(bodies)
        spans = _response_spans([len(body["responses"]) for body in bodies], self.chunk_size)
        answers = await _all_or_none(
            self._push_chunk(bodies[start:end], ids[start:end], start, mode) for start, end in spans
        )
        return BaselinesPushResult(
            model=answers[-1].model if answers else None,
            stored=sum(answer.stored for answer in answers),
            failed=sum(answer.failed for answer in answers),
            results=[result for answer in answers for result in answer.results],
        )

    async def get_reward(
        self, queries: Sequence[str], prompts: Sequence[str] | None = None
    ) -> OpenRLHFRewards:
        """OpenRLHF's protocol (``POST /get_reward``): formatted queries (prompt + response with
        the chat template applied), each with its formatted prompt; sent in chunks of
        ``chunk_size``, retried like scoring, reassembled in order."""
        if prompts is not None and len(prompts) != len(queries):
            raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries")
        spans = _spans(len(queries), self.chunk_size)
        answers = await _all_or_none(
            self._get_reward_chunk(queries[a:b], prompts[a:b] if prompts else None, a)
            for a, b in spans
        )
        return OpenRLHFRewards.joined(answers)

    async def _get_reward_chunk(
        self, queries: Sequence[str], prompts: Sequence[str] | None, offset: int
    ) -> OpenRLHFRewards:
        body: dict[str, Any] = {"query": list(queries)}
        if prompts is not None:
            body["prompts"] = list(prompts)
        # OpenRLHF's body has no room for it: the model's name goes in the query string.
        path = "/get_reward" if self.model is None else f"/get_reward?model={quote(self.model)}"
        response = await self._send("POST", path, body, offset=offset)
        answer = _parse(OpenRLHFRewards, response, offset)
        _check_count(len(answer.rewards), len(queries), response, offset)
        return answer

    async def models(self) -> ModelsInfo:
        """The active model version and every loaded model (``GET /v1/models``).

        Raises:
            EndpointNotFound: the service has no ``GET /v1/models`` (it answered 404).
            RewardServiceError: any other refusal, or retries ran out.
        """
        try:
            response = await self._send("GET", "/v1/models", None)
        except RewardServiceError as error:
            if error.status != 404:
                raise
            raise EndpointNotFound(
                f"the service does not serve GET /v1/models ({error.message}); it predates "
                "model management, or a proxy in front of it does not route the path",
                status=404,
                error_type=error.error_type,
                url=error.url,
            ) from error
        return _parse(ModelsInfo, response)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- one call on one model version ------------------------------------------------------

    async def _score_pinned_by_user(
        self, bodies: list[dict[str, Any]], options: dict[str, Any], version: str
    ) -> _Scored:
        """Every chunk pinned to the caller's version, on whichever replicas serve it."""
        try:
            return await self._score_call(bodies, options, version)
        except _VersionGone as gone:
            raise gone.refusal from None

    async def _score_on_one_version(
        self, bodies: list[dict[str, Any]], options: dict[str, Any]
    ) -> _Scored:
        """The call pinned to the version the client follows (unpinned before it has seen a
        change); scored again once, unpinned, when its version left every replica: a rollback
        everywhere, or a swap finishing in the middle of the call."""
        try:
            return await self._score_call(bodies, options, self._followed_version)
        except _VersionGone as gone:
            replaced = gone.version
        log.warning(
            "no replica serves model version %s any more; scoring the call again on the "
            "version the service gives now",
            replaced,
        )
        try:
            again = await self._score_call(bodies, options, None)
        except _VersionGone as gone:
            raise gone.refusal from None
        return _Scored(results=again.results, version=again.version, replaced=replaced)

    async def _score_call(
        self, bodies: list[dict[str, Any]], options: dict[str, Any], pin: str | None
    ) -> _Scored:
        """Every chunk scored by ``pin``, or when it is None, by the version that answers the
        first chunk (sent alone for that, the others then concurrently).

        Raises:
            _VersionGone: no replica serves that version.
        """
        spans = _spans(len(bodies), self.chunk_size)
        refusing = _Refusals()
        done: list[list[RewardResult]] = []
        if pin is None:
            start, end = spans.pop(0)
            first = await self._score_chunk(bodies[start:end], start, options, None, refusing)
            done.append(first.results)
            pin = first.version
        version = pin
        rest = await _all_or_none(
            self._score_chunk(bodies[start:end], start, options, version, refusing)
            for start, end in spans
        )
        done.extend(chunk.results for chunk in rest)
        return _Scored(results=[result for chunk in done for result in chunk], version=version)

    @property
    def _followed_version(self) -> str | None:
        """The version later calls are pinned to: the latest one seen, so a replica that has
        not switched to it yet is skipped, never followed back. Once it answered as draining
        (its replica activated another), calls go unpinned and follow the new active one."""
        if self._seen_version in self._retiring:
            return None
        return self._seen_version

    def _saw_version(self, version: str, *, settled: bool = False) -> None:
        """A call, or an unpinned answer (a baseline upload's), got ``version``: a change,
        unless it is one the client moved on from (a replica behind, or a call that began
        before the move) and not ``settled`` (the caller's pin, or a rollback everywhere)."""
        if version == self._seen_version:
            return
        if version in self._left_versions and not settled:
            return
        old, self._seen_version = self._seen_version, version
        if old is not None:
            self._left_versions.add(old)
        self._left_versions.discard(version)
        log.info("model version %s -> %s", old, version)
        if self.on_version_change is not None:
            self.on_version_change(old, version)

    # --- one request -----------------------------------------------------------------------

    def _reward_options(
        self, contrastive: Mapping[str, Any] | None, truncation: Truncation | None
    ) -> dict[str, Any]:
        options: dict[str, Any] = {
            "contrastive": None if contrastive is None else dict(contrastive)
        }
        if truncation is not None:
            options["truncation"] = truncation
        if self.model is not None:
            options["model"] = self.model
        return options

    async def _score_chunk(
        self,
        items: list[dict[str, Any]],
        offset: int,
        options: dict[str, Any],
        pin: str | None,
        refusing: _Refusals,
    ) -> _Scored:
        """One chunk's results: by any version when ``pin`` is None, else by ``pin``, tried on
        each replica not in ``refusing`` until one serves it. A replica found not to serve it
        is added to ``refusing``.

        Raises:
            _VersionGone: every replica refuses ``pin``.
        """
        body = {"items": items, **options}
        if pin is not None:
            body["model_version"] = pin
        while True:
            gone = refusing.replicas.issuperset(self.replicas.urls)
            if pin is not None and refusing.latest is not None and gone:
                raise _VersionGone(pin, refusing.latest)
            try:
                replica, response = await self._exchange(
                    "POST", "/v1/rewards", body, offset=offset, skip=frozenset(refusing.replicas)
                )
            except RewardServiceError as error:
                if pin is None or error.replica is None or not _refuses_version(error, pin):
                    raise
                refusing.add(error.replica, error)
                continue
            answer = _parse(RewardsAnswer, response, offset)
            _check_count(len(answer.results), len(items), response, offset)
            version = answer.model.version
            if answer.model.state == "draining":
                self._retiring.add(version)
            if pin is not None and version != pin:
                # A service that ignored the pin: as good as a refusal.
                refusing.add(replica, _other_version(pin, version, response, offset))
                continue
            results = [
                RewardResult.model_validate({**r, "model_version": version}) for r in answer.results
            ]
            return _Scored(results=results, version=version)

    async def _push_chunk(
        self, items: list[dict[str, Any]], ids: list[str], offset: int, mode: Mode
    ) -> BaselinesPushResult:
        body: dict[str, Any] = {"items": items, "mode": mode}
        if self.model is not None:
            body["model"] = self.model
        # Safe to retry in both modes: the items' upload ids make a repeated append a no-op.
        response = await self._send("PUT", "/v1/baselines", body, offset=offset)
        answer = _parse(BaselinesPutAnswer, response, offset)
        _check_count(len(answer.results), len(items), response, offset)
        version = answer.model.version
        self._saw_version(version)
        results = [
            BaselineStored.model_validate({**r, "model_version": version}) for r in answer.results
        ]
        if [result.prompt_id for result in results] != ids:
            raise _bad_answer("it answered for other prompts than were sent", response, offset)
        return BaselinesPushResult(
            model=answer.model, stored=answer.stored, failed=answer.failed, results=results
        )

    async def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        offset: int | None = None,
    ) -> httpx.Response:
        """One request, retried under the policy, each try on the next replica in turn.

        Raises:
            RewardServiceError: the last failure, when it is not retryable or retries ran out.
        """
        _, response = await self._exchange(method, path, body, offset=offset)
        return response

    async def _exchange(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        offset: int | None = None,
        skip: frozenset[str] = frozenset(),
    ) -> tuple[str, httpx.Response]:
        """``_send`` on the replicas not in ``skip``; the answer and the replica that gave it.

        Raises:
            RewardServiceError: the last failure (its ``replica`` set), when it is not
                retryable or retries ran out.
        """
        avoid: str | None = None
        retry = 0
        while True:
            outcome = await self._try(method, path, body, offset, avoid, skip)
            if not isinstance(outcome, _Failure):
                return outcome
            if not outcome.retryable or retry >= self.retry.retries:
                outcome.error.retries = retry
                outcome.error.replica = outcome.replica
                raise outcome.error from outcome.cause
            await self._pause(retry, outcome, skip)
            avoid = outcome.replica
            retry += 1

    async def _try(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        offset: int | None,
        avoid: str | None,
        skip: frozenset[str],
    ) -> tuple[str, httpx.Response] | _Failure:
        """The replica and its answer if the try succeeded, else what went wrong."""
        async with self._slots:
            # The replica is chosen once a slot is free, not before waiting for one: by then an
            # earlier request may have found it down.
            replica = self.replicas.pick(avoid=avoid, skip=skip)
            try:
                response = await self._http.request(method, replica + path, json=body)
            except httpx.TransportError as error:
                failure = self._transport_failure(error, replica, path, offset)
            else:
                if response.is_success:
                    return replica, response
                failure = self._status_failure(response, replica, offset)
            if failure.replica_down:
                self.replicas.mark_down(replica)
            return failure

    def _status_failure(
        self, response: httpx.Response, replica: str, offset: int | None
    ) -> _Failure:
        status = response.status_code
        return _Failure(
            error=RewardServiceError.from_response(response, offset=offset),
            replica=replica,
            retryable=self.retry.retryable_status(status),
            replica_down=status in REPLICA_DOWN_STATUSES,
            retry_after_s=parse_retry_after(response.headers),
        )

    def _transport_failure(
        self,
        error: httpx.TransportError,
        replica: str,
        path: str,
        offset: int | None,
    ) -> _Failure:
        message = f"{type(error).__name__}: {error}"
        url = replica + path
        return _Failure(
            error=RewardServiceError(message, error_type="unreachable", url=url, offset=offset),
            replica=replica,
            retryable=True,
            replica_down=replica_down(error),
            cause=error,
        )

    async def _pause(self, retry: int, failure: _Failure, skip: frozenset[str]) -> None:
        """Wait before the next try: not at all when the failure was the replica's and
        another one (not in ``skip``) is up; else the policy's jittered backoff, at least any
        Retry-After."""
        if failure.replica_down and self.replicas.other_available(failure.replica, skip):
            log.warning("%s; trying another replica", failure.error)
            return
        delay = self.retry.delay_s(retry, failure.retry_after_s)
        log.warning(
            "%s; retry %d of %d in %.2f s", failure.error, retry + 1, self.retry.retries, delay
        )
        await asyncio.sleep(delay)


class RewardClient:
    """The blocking ``AsyncRewardClient``: same arguments, same methods, same results.

    It owns an event loop running in a daemon thread, and each call waits for its coroutine
    there, so it works from any thread, including one already running an event loop. Close it
    (``close`` or ``with``) to stop the thread. ``on_version_change`` runs on that thread.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        timeout: httpx.Timeout | None = None,
        retry: RetryPolicy | None = None,
        chunk_size: int = 256,
        max_concurrency: int = 8,
        model: str | None = None,
        model_version: str | None = None,
        on_version_change: VersionHook | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        async def build() -> AsyncRewardClient:
            # Built on its loop, so that everything it creates belongs to that loop.
            return AsyncRewardClient(
                urls,
                token=token,
                timeout=timeout,
                retry=retry,
                chunk_size=chunk_size,
                max_concurrency=max_concurrency,
                model=model,
                model_version=model_version,
                on_version_change=on_version_change,
                transport=transport,
            )

        self._loop = _LoopThread()
        try:
            self._client = self._loop.run(build())
        except BaseException:
            self._loop.stop()
            raise

    @property
    def model(self) -> str | None:
        """The reward model's name sent with each request (None: the service's default)."""
        return self._client.model

    @property
    def model_version(self) -> str | None:
        """The pinned version (None: whatever is active); settable, e.g. after a swap."""
        return self._client.model_version

    @model_version.setter
    def model_version(self, version: str | None) -> None:
        self._client.model_version = version

    @property
    def seen_model_version(self) -> str | None:
        """See ``AsyncRewardClient.seen_model_version``."""
        return self._client.seen_model_version

    @property
    def urls(self) -> list[str]:
        """The replicas' base URLs."""
        return list(self._client.replicas.urls)

    def score(
        self,
        items: Iterable[Item | Mapping[str, Any]],
        contrastive: Mapping[str, Any] | None = SERVER_DEFAULTS,
        truncation: Truncation | None = None,
    ) -> list[RewardResult]:
        """See ``AsyncRewardClient.score``."""
        # The items are read here, in the caller's thread: an iterator may not be thread-safe.
        return self._loop.run(self._client.score(list(items), contrastive, truncation))

    def push_baselines(
        self, items: Iterable[BaselineItem | Mapping[str, Any]], mode: Mode = "replace"
    ) -> BaselinesPushResult:
        """See ``AsyncRewardClient.push_baselines``."""
        return self._loop.run(self._client.push_baselines(list(items), mode))

    def get_reward(
        self, queries: Sequence[str], prompts: Sequence[str] | None = None
    ) -> OpenRLHFRewards:
        """``AsyncRewardClient.get_reward``, blocking."""
        return self._loop.run(self._client.get_reward(queries, prompts))

    def models(self) -> ModelsInfo:
        """See ``AsyncRewardClient.models``."""
        return self._loop.run(self._client.models())

    def close(self) -> None:
        """Close the connections and stop the background thread; calling it again does nothing."""
        if self._loop.closed:
            return
        try:
            self._loop.run(self._client.aclose())
        finally:
            self._loop.stop()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _LoopThread:
    """An event loop running forever in a daemon thread (daemon: a client never closed must
    not keep the interpreter from exiting)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.closed = False
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="crs-reward-client", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result in the calling thread."""
        if self.closed or threading.current_thread() is self._thread:
            coroutine.close()
            why = "is closed" if self.closed else "was called from its own hook (it would deadlock)"
            raise RuntimeError(f"the RewardClient {why}")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted while waiting (Ctrl-C): stop the work too rather than let it run on.
            future.cancel()
            raise

    def stop(self) -> None:
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


# --- helpers -------------------------------------------------------------------------------


async def _all_or_none(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """The results of running the coroutines concurrently, in order. The first failure cancels
    the others and is raised: a caller gets every result or an error, never a partial list."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _to_json(
    items: Iterable[Input | Mapping[str, Any]], model: type[Input]
) -> list[dict[str, Any]]:
    """Each item checked against ``model`` and as sent; a bad one is named by its index."""
    bodies = []
    for index, item in enumerate(items):
        try:
            checked = item if isinstance(item, model) else model.model_validate(item)
        except ValidationError as error:
            raise ValueError(f"item {index} is not a valid {model.__name__}: {error}") from None
        bodies.append(checked.to_json())
    return bodies


def _with_upload_ids(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each baseline item with its ``upload_id``: the caller's, else a new random one. Chosen
    once per call, before the first try, so that every retry of an item carries the same id."""
    for body in bodies:
        body.setdefault("upload_id", uuid.uuid4().hex)
    return bodies


def _unique_prompt_ids(bodies: list[dict[str, Any]]) -> list[str]:
    """Each baseline item's prompt id, refusing a prompt given twice."""
    ids = [prompt_id(body["prompt"], body.get("prompt_id")) for body in bodies]
    first: dict[str, int] = {}
    for index, pid in enumerate(ids):
        if pid in first:
            raise ValueError(f"prompt {pid} is given twice (items {first[pid]} and {index})")
        first[pid] = index
    return ids


def _spans(count: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive chunks of at most ``size``."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _response_spans(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive prompts with at most ``limit`` responses together; a
    prompt with more goes alone (it is never split: a replace in two parts keeps only one)."""
    spans: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > limit:
            spans.append((start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        spans.append((start, len(sizes)))
    return spans


def _parse(model: type[Answer], response: httpx.Response, offset: int | None = None) -> Answer:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as error:
        raise _bad_answer(str(error), response, offset) from None


def _check_count(got: int, sent: int, response: httpx.Response, offset: int | None) -> None:
    if got != sent:
        raise _bad_answer(f"{got} results for {sent} items", response, offset)


def _refuses_version(error: RewardServiceError, version: str) -> bool:
    """Whether ``error`` says its replica does not serve ``version`` (rather than that the
    request was bad)."""
    if error.status != 409:
        return False
    if error.error_type == VERSION_NOT_LOADED:
        return True
    details = error.details if isinstance(error.details, dict) else {}
    if details.get("reason") == VERSION_NOT_LOADED:
        return True
    return error.error_type == "conflict" and details.get("requested") == version


def _other_version(
    pin: str, version: str, response: httpx.Response, offset: int
) -> RewardServiceError:
    """The refusal of a replica that answered a request pinned to ``pin`` with ``version``."""
    return RewardServiceError(
        f"answered with model version {version} a request pinned to {pin}",
        status=409,
        error_type=VERSION_NOT_LOADED,
        details={"requested": pin, "active": version},
        url=str(response.request.url),
        offset=offset,
    )


def _bad_answer(why: str, response: httpx.Response, offset: int | None) -> RewardServiceError:
    return RewardServiceError(
        f"unexpected answer: {why}",
        status=response.status_code,
        error_type="bad_answer",
        url=str(response.request.url),
        offset=offset,
    )
