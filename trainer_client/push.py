"""Upload a baseline file to the service: ``crs-trainer push-baselines FILE --url URL``.

The file is streamed (checked in a first pass, sent in a second) in chunks bounded by prompts
and by responses, each one ``PUT /v1/baselines``. Refusals that mean "later" (429, 503, 504,
connection failures, prompts answered ``stored: false``) are retried with the shared
``RetryPolicy``; any other refusal stops the upload with the server's message. Under
``replace`` a re-run is idempotent, so after a failure the fix is to run it again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from trainer_client.progress import ProgressBar
from trainer_client.records import BaselineRecord, iter_baseline_file
from trainer_client.retry import RetryPolicy, parse_retry_after, retryable_error

log = logging.getLogger("crs.push")

Mode = Literal["replace", "append"]

_APPEND_NOT_RETRIED = "append is not retried after this: it may have been stored"

# How many failed prompts the summary lists by id; the count covers the rest.
_LISTED_FAILURES = 20


@dataclass(frozen=True, kw_only=True)
class PushOptions:
    """Where and how to upload; validated at construction."""

    url: str
    token: str | None = None
    chunk_prompts: int = 64
    chunk_responses: int = 1024
    mode: Mode = "replace"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(300.0, connect=10.0))

    def __post_init__(self) -> None:
        check_url(self.url)
        if self.chunk_prompts < 1:
            raise ValueError(f"chunk_prompts must be >= 1, got {self.chunk_prompts}")
        if self.chunk_responses < 1:
            raise ValueError(f"chunk_responses must be >= 1, got {self.chunk_responses}")
        if self.mode not in ("replace", "append"):
            raise ValueError(f"mode must be replace or append, got {self.mode!r}")

    @property
    def endpoint(self) -> str:
        """``{url}/v1/baselines``; a path prefix in the URL (behind a proxy) is kept."""
        return self.url.rstrip("/") + "/v1/baselines"


@dataclass(frozen=True, kw_only=True)
class PromptOutcome:
    """What became of one uploaded prompt."""

    prompt_id: str
    stored: bool
    mean: float | None = None
    error: str | None = None


@dataclass(kw_only=True)
class PushSummary:
    """Totals of one upload; ``failed`` counts every prompt of the file not stored."""

    stored: int = 0
    failed: int = 0
    means: list[float] = field(default_factory=list)
    failures: list[PromptOutcome] = field(default_factory=list)
    model_versions: set[str] = field(default_factory=set)
    fatal: str | None = None
    elapsed_s: float = 0.0

    @property
    def mean_baseline(self) -> float | None:
        """The mean over stored prompts of their baseline mean (None when none was stored)."""
        return math.fsum(self.means) / len(self.means) if self.means else None

    def add(self, outcome: PromptOutcome) -> None:
        """Count one prompt's outcome."""
        if outcome.stored:
            self.stored += 1
            if outcome.mean is not None:
                self.means.append(outcome.mean)
        else:
            self.failed += 1
            self.failures.append(outcome)

    def line(self) -> str:
        """The one-line summary the command prints."""
        mean = "n/a" if self.mean_baseline is None else f"{self.mean_baseline:.6g}"
        models = ",".join(sorted(self.model_versions)) or "none"
        return (
            f"push-baselines: stored {self.stored} prompts, failed {self.failed}, "
            f"mean baseline {mean}, model {models}, {self.elapsed_s:.1f} s"
        )


class PushError(Exception):
    """The upload cannot go on: a refusal that retrying will not fix, or retries ran out."""


class _Stored(BaseModel):
    """One result of ``PUT /v1/baselines``; extra fields a newer service adds are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt_id: str
    stored: bool
    mean: float | None = None
    error: str | None = None


class _ModelRef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: str


class _PutResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: _ModelRef
    results: list[_Stored]


def check_url(url: str) -> None:
    """Refuse anything but an absolute http(s) URL with a host.

    Raises:
        ValueError: naming the problem.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ValueError(f"bad --url {url!r}: {error}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"bad --url {url!r}: expected http(s)://host[:port]")


def count_records(path: Path) -> int:
    """Check every line of a baseline file and count its prompts (the first pass).

    Raises:
        RecordError: naming the first unusable line, before anything is sent.
    """
    return sum(1 for _ in iter_baseline_file(path))


def chunked(
    records: Iterable[BaselineRecord], max_prompts: int, max_responses: int
) -> Iterator[list[BaselineRecord]]:
    """Consecutive chunks of at most ``max_prompts`` prompts and ``max_responses`` responses.

    A prompt is never split across chunks (under replace the second part would overwrite the
    first), so a prompt with more responses than ``max_responses`` travels alone. A prompt id
    seen again starts a new chunk: the service refuses one prompt twice in a request, and
    sending them in file order keeps "the later line wins" under replace.
    """
    chunk: list[BaselineRecord] = []
    ids: set[str] = set()
    responses = 0
    for record in records:
        too_many = responses + len(record.responses) > max_responses
        if chunk and (len(chunk) == max_prompts or too_many or record.prompt_id in ids):
            yield chunk
            chunk, ids, responses = [], set(), 0
        chunk.append(record)
        ids.add(record.prompt_id)
        responses += len(record.responses)
    if chunk:
        yield chunk


def push_baselines(
    path: Path,
    options: PushOptions,
    *,
    quiet: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> PushSummary:
    """Upload every prompt of the baseline file at ``path``.

    Never raises for the server's refusals: a fatal one stops the upload and is named in
    ``summary.fatal``, and every prompt not stored is counted in ``summary.failed``.

    Raises:
        RecordError: the file has an unusable line (found before anything is sent).
    """
    started = time.monotonic()
    total = count_records(path)
    summary = PushSummary()
    headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    with (
        httpx.Client(timeout=options.timeout, headers=headers) as client,
        ProgressBar(total, description="pushing", quiet=quiet) as bar,
    ):
        uploader = _Uploader(client=client, options=options, sleep=sleep, summary=summary)
        records = _sendable(iter_baseline_file(path), summary, bar)
        for chunk in chunked(records, options.chunk_prompts, options.chunk_responses):
            try:
                outcomes = uploader.put(chunk)
            except PushError as error:
                summary.fatal = str(error)
                break
            for outcome in outcomes:
                summary.add(outcome)
            bar.update(len(chunk))
    # Prompts after a fatal refusal were never sent: they are failures too.
    summary.failed = total - summary.stored
    summary.elapsed_s = time.monotonic() - started
    return summary


def _sendable(
    records: Iterable[BaselineRecord], summary: PushSummary, bar: ProgressBar
) -> Iterator[BaselineRecord]:
    """Drop empty responses, which the service refuses (one would fail its whole chunk)."""
    for record in records:
        kept = [response for response in record.responses if response]
        if len(kept) == len(record.responses):
            yield record
            continue
        dropped = len(record.responses) - len(kept)
        log.warning(
            "line %d: dropping %d empty response(s) of prompt %s",
            record.line,
            dropped,
            record.prompt_id,
        )
        if kept:
            yield BaselineRecord(
                line=record.line, prompt=record.prompt, prompt_id=record.prompt_id, responses=kept
            )
        else:
            error = "every response is empty; nothing to store"
            summary.add(PromptOutcome(prompt_id=record.prompt_id, stored=False, error=error))
            bar.update(1)


@dataclass(kw_only=True)
class _Uploader:
    """Sends chunks with retries; one chunk's retries share one budget."""

    client: httpx.Client
    options: PushOptions
    sleep: Callable[[float], None]
    summary: PushSummary

    def put(self, chunk: Sequence[BaselineRecord]) -> list[PromptOutcome]:
        """The outcome of every prompt of the chunk, in order.

        Prompts answered ``stored: false`` are sent again (alone, so that append mode does
        not store the others twice) until the retry budget is spent.

        Raises:
            PushError: on a refusal that retrying will not fix, or when retries ran out.
        """
        outcomes: dict[int, PromptOutcome] = {}
        pending = list(range(len(chunk)))
        retry = 0
        while True:
            items = [chunk[i] for i in pending]
            answer = self._send(items, retry)
            if answer is None:
                # Payload too large for the server: halve what is still pending and go on.
                half = len(items) // 2
                sent = self.put(items[:half]) + self.put(items[half:])
            else:
                retry, sent = answer.retries_used, answer.outcomes
            for position, outcome in zip(pending, sent, strict=True):
                outcomes[position] = outcome
            pending = [i for i in pending if not outcomes[i].stored]
            if not pending or retry >= self.options.retry.retries:
                return [outcomes[i] for i in range(len(chunk))]
            log.warning("%d prompt(s) not stored; retrying them", len(pending))
            self._wait(retry, None)
            retry += 1

    def _send(self, items: Sequence[BaselineRecord], retry: int) -> _Answer | None:
        """One PUT of ``items``, retried on transient failures; None for 413 on several items."""
        body = {"items": [item.to_json() for item in items], "mode": self.options.mode}
        idempotent = self.options.mode == "replace"
        while True:
            try:
                response = self.client.put(self.options.endpoint, json=body)
            except httpx.TransportError as error:
                reason = f"{type(error).__name__}: {error}"
                if not retryable_error(error, idempotent=idempotent):
                    message = f"{reason} ({_APPEND_NOT_RETRIED})"
                    raise PushError(message) from error
                retry = self._next_retry(retry, reason, None)
                continue
            status = response.status_code
            if self.options.retry.retryable_status(status, idempotent=idempotent):
                reason = f"HTTP {status}: {error_message(response)}"
                retry = self._next_retry(retry, reason, parse_retry_after(response.headers))
                continue
            if status == 413 and len(items) > 1:
                return None
            if not response.is_success:
                message = f"HTTP {status}: {error_message(response)}"
                if self.options.retry.retryable_status(status):  # refused only as not idempotent
                    message += f" ({_APPEND_NOT_RETRIED})"
                raise PushError(message)
            return _Answer(outcomes=self._outcomes(items, response), retries_used=retry)

    def _next_retry(self, retry: int, reason: str, retry_after_s: float | None) -> int:
        if retry >= self.options.retry.retries:
            raise PushError(f"{reason}; gave up after {retry} retries")
        log.warning("%s; retry %d of %d", reason, retry + 1, self.options.retry.retries)
        self._wait(retry, retry_after_s)
        return retry + 1

    def _wait(self, retry: int, retry_after_s: float | None) -> None:
        self.sleep(self.options.retry.delay_s(retry, retry_after_s))

    def _outcomes(
        self, items: Sequence[BaselineRecord], response: httpx.Response
    ) -> list[PromptOutcome]:
        try:
            parsed = _PutResponse.model_validate_json(response.content)
        except ValidationError as error:
            raise PushError(f"unexpected answer from {self.options.endpoint}: {error}") from None
        if [r.prompt_id for r in parsed.results] != [item.prompt_id for item in items]:
            raise PushError("the service answered for other prompts than were sent")
        self.summary.model_versions.add(parsed.model.version)
        return [
            PromptOutcome(prompt_id=r.prompt_id, stored=r.stored, mean=r.mean, error=r.error)
            for r in parsed.results
        ]


@dataclass(frozen=True, kw_only=True)
class _Answer:
    outcomes: list[PromptOutcome]
    retries_used: int


def error_message(response: httpx.Response) -> str:
    """The message of the service's error envelope, or the start of whatever else came back
    (a proxy in front of the service answers in its own format)."""
    try:
        body: Any = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def failure_report(summary: PushSummary) -> list[str]:
    """Lines naming the failed prompts (the first few) and why, for stderr."""
    lines = [f"error: {summary.fatal}"] if summary.fatal else []
    for outcome in summary.failures[:_LISTED_FAILURES]:
        lines.append(f"not stored: {outcome.prompt_id}: {outcome.error or 'no reason given'}")
    hidden = len(summary.failures) - _LISTED_FAILURES
    if hidden > 0:
        lines.append(f"... and {hidden} more prompt(s) not stored")
    unsent = summary.failed - len(summary.failures)
    if unsent > 0:
        lines.append(f"{unsent} prompt(s) were not sent; re-run to upload them")
    return lines
