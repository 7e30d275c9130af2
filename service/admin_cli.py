"""`crs-service models`: list, load, activate and unload model versions on running replicas.

An HTTP client of the admin plane (DESIGN.md 4, "Models and hot swap"): ``POST /admin/models``,
``POST /admin/models/{version}/activate`` and ``DELETE /admin/models/{version}``, with the
progress of a load or a rebaseline read from ``GET /v1/models``.

Several replicas are changed one at a time: each is waited for until it serves as asked and
answers ``/readyz`` 200 before the next is touched, so a failure stops the rollout with the rest
of the fleet as it was, and the report says which replicas were done and which were not touched.
A load that activates on several replicas loads everywhere first and only then activates one
replica after another: the slow part (loading, warming, the golden check) happens while every
replica still serves the old version, and the fleet is split across versions only for the
activations. Before anything is changed every replica is listed once, so an unreachable replica
or a version missing somewhere stops the command with nothing done.

Needs httpx (the ``client`` extra), never torch: it runs from an operator's machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO
from urllib.parse import quote

import httpx

from trainer_client.client.replicas import base_url
from trainer_client.client.retry import RetryPolicy, parse_retry_after
from trainer_client.progress import ProgressBar

# 0 done, 1 a replica failed (or could not be reached), 2 the command was unusable as given.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

ADMIN_TOKEN_ENV = "CRS_ADMIN_TOKEN"
# The variable crs-trainer reads its API token from.
API_TOKEN_ENV = "CRS_API_TOKEN"

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
Goal = Literal["ready", "active", "unloaded"]

# States a version can be activated from (activating the active one answers changed: false).
ACTIVATABLE = frozenset({"ready", "active"})

# Starlette's detail for a path no route serves: a 404 saying so on /admin/... means the admin
# plane is off, whereas an unknown version is a 404 of the route itself, with its own message.
ROUTE_ABSENT_MESSAGE = "Not Found"


class UsageError(Exception):
    """The command cannot run as given (exit code 2)."""


class ReplicaError(Exception):
    """A replica refused or failed an operation. The message names the replica, never a token."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url


class RolloutStopped(Exception):
    """An operation stopped; ``lines`` say why, what was done and what was not touched."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__(lines[0] if lines else "stopped")
        self.lines = list(lines)


# --- what GET /v1/models says ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RebaselineStatus:
    """Progress of an eager rebaseline: stored baseline prompts rescored by the new version."""

    state: str
    prompts_total: int
    prompts_done: int
    error: str | None

    def describe(self) -> str:
        return f"{self.state} {self.prompts_done}/{self.prompts_total}"


@dataclass(frozen=True, kw_only=True)
class ModelVersion:
    """One version a replica lists: loading, ready, active, draining or failed."""

    name: str
    version: str
    path: str | None
    state: str
    error: str | None
    in_flight: int
    default: bool
    rebaseline: RebaselineStatus | None


@dataclass(frozen=True, kw_only=True)
class Listing:
    """A replica's ``GET /v1/models``, parsed; ``body`` is the answer as sent (for ``--json``)."""

    default: str | None
    active_versions: dict[str, str | None]
    models: tuple[ModelVersion, ...]
    body: dict[str, Any]

    def find(self, version: str) -> ModelVersion | None:
        return next((entry for entry in self.models if entry.version == version), None)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0


def parse_rebaseline(value: Any) -> RebaselineStatus | None:
    if not isinstance(value, dict):
        return None
    return RebaselineStatus(
        state=str(value.get("state", "?")),
        prompts_total=_count(value.get("prompts_total")),
        prompts_done=_count(value.get("prompts_done")),
        error=_optional_str(value.get("error")),
    )


def parse_listing(body: Any) -> Listing:
    """The listing of the spec; lenient about fields it does not need, so that a server adding
    fields (or leaving an optional one out) does not break the client.

    Raises:
        ValueError: the answer is not a listing at all.
    """
    if not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise ValueError('expected an object with a "models" list')
    models = []
    for item in body["models"]:
        if not isinstance(item, dict) or "version" not in item:
            raise ValueError('every entry of "models" needs a "version"')
        models.append(
            ModelVersion(
                name=str(item.get("name", "?")),
                version=str(item["version"]),
                path=_optional_str(item.get("path")),
                state=str(item.get("state", "?")),
                error=_optional_str(item.get("error")),
                in_flight=_count(item.get("in_flight")),
                default=bool(item.get("default", False)),
                rebaseline=parse_rebaseline(item.get("rebaseline")),
            )
        )
    active = body.get("active_versions")
    return Listing(
        default=_optional_str(body.get("default")),
        active_versions=(
            {str(k): _optional_str(v) for k, v in active.items()}
            if isinstance(active, dict)
            else {}
        ),
        models=tuple(models),
        body=body,
    )


def render_listing(where: str, listing: Listing) -> list[str]:
    """A replica's versions as a table; the default name (what a request without ``"model"``
    gets) is marked with ``*``."""
    if not listing.models:
        return [where, "  (no models)"]
    header = ("NAME", "VERSION", "STATE", "IN_FLIGHT", "REBASELINE", "ERROR")
    rows = [header]
    for entry in listing.models:
        default = entry.default or entry.name == listing.default
        error = entry.error
        if error is None and entry.rebaseline is not None and entry.rebaseline.error:
            error = f"rebaseline: {entry.rebaseline.error}"
        rows.append(
            (
                entry.name + ("*" if default else ""),
                entry.version,
                entry.state,
                str(entry.in_flight),
                entry.rebaseline.describe() if entry.rebaseline else "-",
                " ".join((error or "-").split()),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    table = [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return [where, *(line.rstrip() for line in table), "  * the default model name"]


# --- one replica -------------------------------------------------------------------------


def shown_url(url: str) -> str:
    """``url`` as it may be printed: without a user or password in it."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(userinfo=b"")) if parsed.userinfo else url


def _envelope(response: httpx.Response) -> tuple[str, str]:
    """The error type and message of an error answer, or a short text of what came instead."""
    try:
        error = response.json().get("error")
        return str(error["type"]), str(error["message"])
    except (ValueError, AttributeError, KeyError, TypeError):
        text = " ".join(response.text.split())[:200]
        return "error", text or response.reason_phrase


@dataclass(frozen=True, kw_only=True)
class AdminOptions:
    """How the client talks to replicas and how long it waits.

    Attributes:
        admin_token: the service's ``CRS_ADMIN_TOKEN``; needed by load, activate and unload.
        api_token: one of the service's ``CRS_API_TOKENS``, for ``GET /v1/models``.
        wait_s: how long one replica may take to reach what was asked (loaded, active,
            unloaded, and ``/readyz`` 200) before the command gives up on it.
        poll_s: seconds between two looks at ``GET /v1/models`` while waiting.
        timeout: per request; an activation's request waits up to ``wait_s`` instead, since
            the service answers it once an eager rebaseline is done.
        retry: for the reads (listing, readiness); the admin calls are never repeated, as a
            repeated load would be refused with 409.
    """

    admin_token: str | None = None
    api_token: str | None = None
    wait_s: float = 1800.0
    poll_s: float = 1.0
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(30.0, connect=10.0))
    retry: RetryPolicy = RetryPolicy(retries=3, base_s=0.5, max_s=5.0)

    def __post_init__(self) -> None:
        if not (self.wait_s > 0 and math.isfinite(self.wait_s)):
            raise ValueError(f"--timeout must be a positive number of seconds, got {self.wait_s}")
        if not (self.poll_s >= 0 and math.isfinite(self.poll_s)):
            raise ValueError(f"--poll-interval must be >= 0, got {self.poll_s}")

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(token for token in (self.admin_token, self.api_token) if token)


class Replica:
    """One service replica: its model listing, its readiness and its admin plane."""

    def __init__(
        self, url: str, http: httpx.AsyncClient, options: AdminOptions, *, sleep: Sleep
    ) -> None:
        self.url = url
        self.shown = shown_url(url)
        self._http = http
        self._options = options
        self._sleep = sleep

    async def models(self) -> Listing:
        """``GET /v1/models``, retried over transport failures and 429/503/504."""
        what = "GET /v1/models"
        headers = _bearer(self._options.api_token)
        response = await self._get("/v1/models", headers, what=what, retry_statuses=True)
        if response.status_code != 200:
            raise self._refused(response, what, admin=False)
        try:
            return parse_listing(response.json())
        except ValueError as error:
            raise ReplicaError(
                self.shown, f"{what} did not answer a model listing: {error}"
            ) from None

    async def readiness(self) -> tuple[bool, str]:
        """Whether ``/readyz`` answers 200, and what it says otherwise (503 is an answer here,
        not a failure: the replica may be warming or draining)."""
        response = await self._get("/readyz", {}, what="GET /readyz", retry_statuses=False)
        if response.status_code == 200:
            return True, "ready"
        return False, f"{response.status_code}: {_envelope(response)[1]}"

    async def load(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._admin("POST", "/admin/models", body, what="POST /admin/models")

    async def activate(
        self, version: str, rebaseline: str | None, *, wait_s: float
    ) -> dict[str, Any]:
        body = None if rebaseline is None else {"rebaseline": rebaseline}
        return await self._admin(
            "POST",
            f"/admin/models/{quote(version, safe='@')}/activate",
            body,
            what=f"activating {version}",
            versioned=True,
            # An eager rebaseline is done before the answer: that can take minutes.
            timeout=httpx.Timeout(self._options.timeout.connect, read=wait_s, write=30.0),
        )

    async def unload(self, version: str) -> dict[str, Any]:
        return await self._admin(
            "DELETE",
            f"/admin/models/{quote(version, safe='@')}",
            None,
            what=f"unloading {version}",
            versioned=True,
        )

    async def _admin(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        what: str,
        versioned: bool = False,
        timeout: httpx.Timeout | None = None,
    ) -> dict[str, Any]:
        """One admin call, never repeated: each changes the replica."""
        try:
            response = await self._http.request(
                method,
                self.url + path,
                json=body,
                headers=_bearer(self._options.admin_token),
                timeout=timeout or self._options.timeout,
            )
        except httpx.TransportError as error:
            raise self._unreachable(error, what) from None
        if response.status_code not in (200, 202):
            raise self._refused(response, what, admin=True, versioned=versioned)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ReplicaError(self.shown, f"{what}: the answer is not a JSON object")
        return answer

    async def _get(
        self, path: str, headers: dict[str, str], *, what: str, retry_statuses: bool
    ) -> httpx.Response:
        policy = self._options.retry
        retry = 0
        while True:
            try:
                response = await self._http.get(self.url + path, headers=headers)
            except httpx.TransportError as error:
                if retry >= policy.retries:
                    raise self._unreachable(error, what) from None
                delay = policy.delay_s(retry)
            else:
                retryable = retry_statuses and policy.retryable_status(response.status_code)
                if not retryable or retry >= policy.retries:
                    return response
                delay = policy.delay_s(retry, parse_retry_after(response.headers))
            retry += 1
            await self._sleep(delay)

    def _unreachable(self, error: httpx.TransportError, what: str) -> ReplicaError:
        reason = str(error) or type(error).__name__
        if isinstance(error, httpx.ConnectError):
            return ReplicaError(
                self.shown, f"cannot connect ({reason}): is the service running at this URL?"
            )
        if isinstance(error, httpx.TimeoutException):
            return ReplicaError(self.shown, f"{what}: no answer in time ({type(error).__name__})")
        return ReplicaError(self.shown, f"{what} failed: {type(error).__name__}: {reason}")

    def _refused(
        self, response: httpx.Response, what: str, *, admin: bool, versioned: bool = False
    ) -> ReplicaError:
        status = response.status_code
        error_type, message = _envelope(response)
        if status == 401 and admin:
            text = (
                f"the admin token was refused (401 on {what}): give the service's "
                f"{ADMIN_TOKEN_ENV} with --admin-token or ${ADMIN_TOKEN_ENV}"
            )
        elif status == 401:
            text = (
                f"the API token was refused (401 on {what}): give one of the service's "
                f"CRS_API_TOKENS with --token or ${API_TOKEN_ENV}"
            )
        elif status == 404 and admin and (not versioned or message == ROUTE_ABSENT_MESSAGE):
            text = (
                f"the admin plane is off (404 on {what}): set {ADMIN_TOKEN_ENV} on the service "
                "to turn it on"
            )
        elif status == 409:
            text = f"{what} refused (409 {error_type}): {message}"
        else:
            text = f"{what} failed ({status} {error_type}): {message}"
        return ReplicaError(self.shown, text)


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- progress ----------------------------------------------------------------------------


class Reporter:
    """Progress and notes on stderr: a live line and bars on a terminal, a line per change
    elsewhere (logs). Every line is scrubbed of the tokens, whatever a server put in it."""

    def __init__(self, stream: TextIO, *, secrets: Sequence[str] = (), quiet: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self.interactive = not quiet and stream.isatty()
        self._secrets = tuple(secret for secret in secrets if secret)
        self._live = False

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def note(self, line: str) -> None:
        """A progress note; not shown with --quiet."""
        if not self.quiet:
            self._print(line)

    def error(self, line: str) -> None:
        """Always shown."""
        self._print(f"crs-service: {line}")

    def live(self, line: str) -> None:
        """A line that the next live line overwrites (a terminal only)."""
        if self.interactive:
            self.stream.write("\r" + self.scrub(line) + "\x1b[K")
            self.stream.flush()
            self._live = True

    def end_live(self) -> None:
        if self._live:
            self.stream.write("\n")
            self._live = False

    def _print(self, line: str) -> None:
        self.end_live()
        print(self.scrub(line), file=self.stream, flush=True)


class VersionWatch:
    """What a wait shows of one version: each state it passes, how long it has been loading,
    and a bar of the rebaseline (prompts_done of prompts_total)."""

    def __init__(
        self,
        reporter: Reporter,
        where: str,
        version: str,
        clock: Clock,
        *,
        known_state: str | None = None,
    ) -> None:
        self._reporter = reporter
        self._where = where
        self._version = version
        self._clock = clock
        self._started = clock()
        # A state already reported (a load just answered "loading") is not reported again.
        self._state = known_state
        self._rebaseline_state: str | None = None
        self._bars = contextlib.ExitStack()
        self._bar: ProgressBar | None = None
        self._bar_done = 0

    def show(self, entry: ModelVersion | None) -> None:
        if entry is None:
            return
        # A finished rebaseline first: its bar closes before the next line is printed.
        finished = entry.rebaseline is not None and entry.rebaseline.state != "running"
        if finished and entry.rebaseline is not None:
            self._show_rebaseline(entry.rebaseline)
        if entry.state != self._state:
            self._state = entry.state
            elapsed = self._clock() - self._started
            self._reporter.note(f"{self._where}: {self._version} {entry.state} ({elapsed:.0f}s)")
        if entry.rebaseline is not None and not finished:
            self._show_rebaseline(entry.rebaseline)
        elif entry.state == "loading":
            elapsed = self._clock() - self._started
            self._reporter.live(f"{self._where}: {self._version} loading {elapsed:.0f}s")

    def _show_rebaseline(self, progress: RebaselineStatus) -> None:
        if progress.state != self._rebaseline_state:
            self._rebaseline_state = progress.state
            self._reporter.note(
                f"{self._where}: {self._version} rebaseline {progress.describe()} prompts"
            )
        if self._bar is None and progress.state == "running" and self._reporter.interactive:
            self._bar = self._bars.enter_context(
                ProgressBar(progress.prompts_total, description=f"{self._where} rebaseline")
            )
        if self._bar is not None and progress.prompts_done > self._bar_done:
            self._bar.update(progress.prompts_done - self._bar_done)
            self._bar_done = progress.prompts_done
        if progress.state != "running":
            self.close()

    def close(self) -> None:
        self._bars.close()
        self._bar = None
        self._reporter.end_live()


# --- the fleet ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LoadRequest:
    """The body of ``POST /admin/models``, less ``activate`` (decided per rollout)."""

    path: str
    name: str | None = None
    rebaseline: str | None = None
    golden: str | None = None
    golden_tolerance: float | None = None

    def body(self, *, activate: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"path": self.path, "activate": activate}
        optional = {
            "name": self.name,
            "rebaseline": self.rebaseline,
            "golden": self.golden,
            "golden_tolerance": self.golden_tolerance,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        return body


class ModelsAdmin:
    """Model operations over a list of replicas, one replica at a time, in the given order.

    ``transport`` replaces httpx's network transport (tests pass an ``httpx.MockTransport``);
    ``sleep`` and ``clock`` are what the waits use.
    """

    def __init__(
        self,
        urls: Sequence[str],
        options: AdminOptions,
        reporter: Reporter,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.monotonic,
    ) -> None:
        self._http = httpx.AsyncClient(transport=transport, timeout=options.timeout)
        self.replicas = [Replica(url, self._http, options, sleep=sleep) for url in urls]
        self._options = options
        self._reporter = reporter
        self._sleep = sleep
        self._clock = clock

    async def __aenter__(self) -> ModelsAdmin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def listings(self) -> list[tuple[Replica, Listing | ReplicaError]]:
        """Every replica's listing, or why there is none."""
        results: list[tuple[Replica, Listing | ReplicaError]] = []
        for replica in self.replicas:
            try:
                results.append((replica, await replica.models()))
            except ReplicaError as error:
                results.append((replica, error))
        return results

    async def load(self, request: LoadRequest, *, activate: bool) -> list[str]:
        """Load ``request.path`` on every replica, and with ``activate`` make it active."""
        before = await self._preflight()
        if not activate or len(self.replicas) == 1:
            goal: Goal = "active" if activate else "ready"
            versions = await self._each(
                lambda replica: self._load_on(replica, request, goal=goal),
                done_as="loaded and active" if activate else "loaded",
                undo=lambda done, versions: _undo_load(done, versions, before, request, activate),
            )
            return [f"{r.shown}: {v} {goal}" for r, v in zip(self.replicas, versions, strict=True)]
        versions = await self._each(
            lambda replica: self._load_on(replica, request, goal="ready"),
            done_as="loaded, not active",
            undo=lambda done, versions: [
                "nothing was activated; to unload it again: "
                + _command("unload", done, _one(versions))
            ],
        )
        if len(set(versions)) > 1:
            pairs = ", ".join(
                f"{r.shown}: {v}" for r, v in zip(self.replicas, versions, strict=True)
            )
            raise RolloutStopped(
                [
                    f"error: the replicas made different versions of {request.path} ({pairs}); "
                    "is the directory the same on every replica? Nothing was activated.",
                ]
            )
        name = request.name
        previous = [
            listing.active_versions.get(name or listing.default or "") for listing in before
        ]
        return await self._activate_all(versions[0], request.rebaseline, previous, loaded=True)

    async def activate(self, version: str, rebaseline: str | None) -> list[str]:
        """Make ``version`` its name's active version on every replica, one after another."""
        before = await self._preflight()
        problems = []
        for replica, listing in zip(self.replicas, before, strict=True):
            entry = listing.find(version)
            if entry is None:
                problems.append(f"{replica.shown}: {version} is not loaded; load it first")
            elif entry.state not in ACTIVATABLE:
                problems.append(f"{replica.shown}: {version} is {entry.state}, not ready")
        if problems:
            raise RolloutStopped([f"error: {p}" for p in problems] + ["nothing was changed"])
        previous = [_active_of(listing, version) for listing in before]
        return await self._activate_all(version, rebaseline, previous, loaded=False)

    async def unload(self, version: str) -> list[str]:
        """Unload ``version`` (not active anywhere) from every replica that has it."""
        before = await self._preflight()
        active = [
            replica.shown
            for replica, listing in zip(self.replicas, before, strict=True)
            if (entry := listing.find(version)) is not None and entry.state == "active"
        ]
        if active:
            raise RolloutStopped(
                [
                    f"error: {version} is active on {', '.join(active)}: activate another "
                    "version there first",
                    "nothing was changed",
                ]
            )
        loaded = {
            replica.url
            for replica, listing in zip(self.replicas, before, strict=True)
            if listing.find(version) is not None
        }

        async def step(replica: Replica) -> str:
            if replica.url not in loaded:
                return f"{replica.shown}: {version} was not loaded"
            await self._unload_on(replica, version)
            return f"{replica.shown}: {version} unloaded"

        return await self._each(step, done_as="unloaded", undo=lambda done, results: [])

    async def _preflight(self) -> list[Listing]:
        """Every replica listed before any is changed: one unreachable stops it all early."""
        listings = []
        errors = []
        for _, result in await self.listings():
            if isinstance(result, ReplicaError):
                errors.append(f"error: {result}")
            else:
                listings.append(result)
        if errors:
            raise RolloutStopped([*errors, "nothing was changed"])
        return listings

    async def _activate_all(
        self, version: str, rebaseline: str | None, previous: list[str | None], *, loaded: bool
    ) -> list[str]:
        """Activate on one replica after another; ``previous`` (each replica's active version
        before) is what a rollback goes back to."""

        def undo(done: list[Replica], _: list[str]) -> list[str]:
            lines = []
            for old in dict.fromkeys(previous[: len(done)]):
                if old is not None and old != version:
                    back = [r for r, p in zip(done, previous, strict=False) if p == old]
                    lines.append("to roll back: " + _command("activate", back, old))
            if loaded:
                lines.append(f"{version} stays loaded (not active) on the replicas not activated")
            return lines

        return await self._each(
            lambda replica: self._activate_on(replica, version, rebaseline),
            done_as=f"{version} active",
            untouched_as="loaded, not activated" if loaded else "not touched",
            undo=undo,
        )

    async def _each(
        self,
        step: Callable[[Replica], Awaitable[str]],
        *,
        done_as: str,
        undo: Callable[[list[Replica], list[str]], list[str]],
        untouched_as: str = "not touched",
    ) -> list[str]:
        """``step`` on each replica in turn; the first failure stops the rollout and says
        which replicas were done, which failed and which were not touched."""
        results: list[str] = []
        for index, replica in enumerate(self.replicas):
            try:
                results.append(await step(replica))
            except ReplicaError as error:
                done = self.replicas[:index]
                untouched = self.replicas[index + 1 :]
                lines = [f"error: {error}"]
                lines.append(f"done ({done_as}): {_names(done)}")
                lines.append(f"failed: {replica.shown}")
                lines.append(f"{untouched_as}: {_names(untouched)}")
                if done:
                    lines += undo(done, results)
                raise RolloutStopped(lines) from None
        return results

    async def _load_on(self, replica: Replica, request: LoadRequest, *, goal: Goal) -> str:
        deadline = self._clock() + self._options.wait_s
        answer = await replica.load(request.body(activate=goal == "active"))
        version = answer.get("version")
        if not isinstance(version, str):
            raise ReplicaError(replica.shown, "POST /admin/models answered without a version")
        self._reporter.note(f"{replica.shown}: loading {version} from {request.path}")
        await self._wait(replica, version, goal, deadline, known_state="loading")
        await self._wait_ready(replica, deadline)
        return version

    async def _activate_on(self, replica: Replica, version: str, rebaseline: str | None) -> str:
        deadline = self._clock() + self._options.wait_s
        self._reporter.note(f"{replica.shown}: activating {version}")
        answer = await self._while_watching(
            replica, version, replica.activate(version, rebaseline, wait_s=self._options.wait_s)
        )
        await self._wait(replica, version, "active", deadline)
        await self._wait_ready(replica, deadline)
        if answer.get("changed") is False:
            return f"{replica.shown}: {version} was already active"
        return f"{replica.shown}: {version} active (previous: {answer.get('previous')})"

    async def _unload_on(self, replica: Replica, version: str) -> None:
        deadline = self._clock() + self._options.wait_s
        await replica.unload(version)
        await self._wait(replica, version, "unloaded", deadline)
        await self._wait_ready(replica, deadline)

    async def _while_watching(
        self, replica: Replica, version: str, call: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        """Await ``call`` (an activation, which answers once its eager rebaseline is done)
        while showing the version's progress from the listing."""
        task = asyncio.ensure_future(call)
        watch = VersionWatch(self._reporter, replica.shown, version, self._clock)
        try:
            while True:
                await asyncio.wait({task}, timeout=self._options.poll_s)
                if task.done():
                    return task.result()
                with contextlib.suppress(ReplicaError):
                    # Progress only: a failed look is no reason to abandon the activation.
                    watch.show((await replica.models()).find(version))
        finally:
            watch.close()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ReplicaError):
                    await task

    async def _wait(
        self,
        replica: Replica,
        version: str,
        goal: Goal,
        deadline: float,
        *,
        known_state: str | None = None,
    ) -> None:
        """Poll the listing until ``version`` is ``goal`` on ``replica``; a failed load, a
        failed rebaseline or the version vanishing ends the wait with the replica's reason."""
        watch = VersionWatch(
            self._reporter, replica.shown, version, self._clock, known_state=known_state
        )
        try:
            while True:
                entry = (await replica.models()).find(version)
                watch.show(entry)
                if reached(entry, goal, where=replica.shown, version=version):
                    return
                if self._clock() >= deadline:
                    state = entry.state if entry else "listed"
                    raise ReplicaError(
                        replica.shown,
                        f"{version} is still {state} after {self._options.wait_s:g}s "
                        f"(waiting for {goal}; see --timeout)",
                    )
                await self._sleep(self._options.poll_s)
        finally:
            watch.close()

    async def _wait_ready(self, replica: Replica, deadline: float) -> None:
        """Poll ``/readyz`` until 200: the replica serves before the next one is touched."""
        said = None
        while True:
            ready, reason = await replica.readiness()
            if ready:
                return
            if reason != said:
                said = reason
                self._reporter.note(f"{replica.shown}: not ready yet ({reason})")
            if self._clock() >= deadline:
                raise ReplicaError(
                    replica.shown,
                    f"/readyz still answers {reason} after {self._options.wait_s:g}s",
                )
            await self._sleep(self._options.poll_s)


def reached(entry: ModelVersion | None, goal: Goal, *, where: str, version: str) -> bool:
    """Whether a version's listing entry is what a wait waits for.

    Raises:
        ReplicaError: it never will be (failed, gone, or replaced by another version).
    """
    if goal == "unloaded":
        return entry is None
    if entry is None:
        raise ReplicaError(
            where, f"{version} is no longer listed (unloaded, or its load cancelled)"
        )
    if entry.state == "failed":
        raise ReplicaError(where, f"loading {version} failed: {entry.error or 'no reason given'}")
    progress = entry.rebaseline
    if entry.state != "active" and progress is not None and progress.state == "failed":
        raise ReplicaError(
            where,
            f"rebaseline of {version} failed after {progress.prompts_done}/"
            f"{progress.prompts_total} prompts: {progress.error or 'no reason given'}",
        )
    if entry.state == "draining":
        raise ReplicaError(where, f"{version} is draining: another version was activated")
    if goal == "ready":
        return entry.state in ACTIVATABLE
    return entry.state == "active"


def _active_of(listing: Listing, version: str) -> str | None:
    """The active version of ``version``'s name on a replica, before the change."""
    entry = listing.find(version)
    name = entry.name if entry is not None else listing.default
    return listing.active_versions.get(name) if name is not None else None


def _undo_load(
    done: list[Replica],
    versions: list[str],
    before: list[Listing],
    request: LoadRequest,
    activate: bool,
) -> list[str]:
    version = _one(versions)
    if not activate:
        return ["to unload it again: " + _command("unload", done, version)]
    # One replica only: a load that activates is never spread over several.
    name = request.name or before[0].default
    previous = before[0].active_versions.get(name) if name else None
    return ["to roll back: " + _command("activate", done, previous)] if previous else []


def _one(versions: list[str]) -> str:
    return versions[0] if len(set(versions)) == 1 else "VERSION"


def _names(replicas: Sequence[Replica]) -> str:
    return ", ".join(replica.shown for replica in replicas) or "none"


def _command(action: str, replicas: Sequence[Replica], version: str) -> str:
    return f"crs-service models {action} {' '.join(r.shown for r in replicas)} {version}"


# --- the command -------------------------------------------------------------------------


def run_models(
    args: argparse.Namespace,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    sleep: Sleep = asyncio.sleep,
    clock: Clock = time.monotonic,
) -> int:
    """`crs-service models list|load|activate|unload`: results on stdout, progress and errors
    on stderr; exit 0 done, 1 a replica failed, 2 unusable as given."""
    env = os.environ if environ is None else environ
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    try:
        urls, options = _parse(args, env)
    except UsageError as error:
        print(f"crs-service: error: {error}", file=err)
        return EXIT_USAGE
    reporter = Reporter(err, secrets=options.secrets, quiet=getattr(args, "quiet", False))
    return asyncio.run(_run(args, urls, options, reporter, out, transport, sleep, clock))


def _parse(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[list[str], AdminOptions]:
    urls = [url.strip() for given in args.urls for url in given.split(",") if url.strip()]
    try:
        urls = [base_url(url) for url in urls]
    except ValueError as error:
        raise UsageError(str(error)) from None
    if len(set(urls)) != len(urls):
        raise UsageError("a replica URL is given twice")
    version = getattr(args, "version", None)
    if version is not None and version.startswith(("http://", "https://")):
        raise UsageError("give the VERSION (e.g. rm@1a2b3c4d) after the replica URLs")
    admin_token = getattr(args, "admin_token", None) or env.get(ADMIN_TOKEN_ENV) or None
    if args.models_action != "list" and admin_token is None:
        raise UsageError(f"no admin token: pass --admin-token or set ${ADMIN_TOKEN_ENV}")
    tolerance = getattr(args, "golden_tolerance", None)
    if tolerance is not None and not (tolerance >= 0 and math.isfinite(tolerance)):
        raise UsageError(f"--golden-tolerance must be >= 0, got {tolerance}")
    try:
        options = AdminOptions(
            admin_token=admin_token,
            api_token=args.token or env.get(API_TOKEN_ENV) or None,
            wait_s=getattr(args, "timeout", 1800.0),
            poll_s=getattr(args, "poll_interval", 1.0),
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    return urls, options


async def _run(
    args: argparse.Namespace,
    urls: list[str],
    options: AdminOptions,
    reporter: Reporter,
    out: TextIO,
    transport: httpx.AsyncBaseTransport | None,
    sleep: Sleep,
    clock: Clock,
) -> int:
    async with ModelsAdmin(
        urls, options, reporter, transport=transport, sleep=sleep, clock=clock
    ) as admin:
        if args.models_action == "list":
            return await _list(admin, reporter, out, as_json=args.json)
        try:
            if args.models_action == "load":
                request = LoadRequest(
                    path=args.path,
                    name=args.name,
                    rebaseline=args.rebaseline,
                    golden=args.golden,
                    golden_tolerance=args.golden_tolerance,
                )
                lines = await admin.load(request, activate=args.activate)
            elif args.models_action == "activate":
                lines = await admin.activate(args.version, args.rebaseline)
            else:
                lines = await admin.unload(args.version)
        except RolloutStopped as stopped:
            for line in stopped.lines:
                reporter.error(line)
            return EXIT_FAILED
    for line in lines:
        print(reporter.scrub(line), file=out)
    return EXIT_OK


async def _list(admin: ModelsAdmin, reporter: Reporter, out: TextIO, *, as_json: bool) -> int:
    results = await admin.listings()
    failed = False
    document: list[dict[str, Any]] = []
    for replica, result in results:
        if isinstance(result, ReplicaError):
            failed = True
            reporter.error(f"error: {result}")
            document.append(
                {"url": replica.shown, "models": None, "error": reporter.scrub(str(result))}
            )
        else:
            document.append({"url": replica.shown, "models": result.body, "error": None})
            if not as_json:
                print("\n".join(render_listing(replica.shown, result)), file=out)
    if as_json:
        print(json.dumps({"replicas": document}, indent=2), file=out)
    return EXIT_FAILED if failed else EXIT_OK
