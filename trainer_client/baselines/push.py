"""Upload a baseline file to the service: ``crs-trainer push-baselines FILE --url URL``.

The file is streamed (checked in a first pass, sent in a second) in chunks bounded by prompts
and by responses, each one ``PUT /v1/baselines`` through ``RewardClient.push_baselines``, so
the upload shares the client's retry policy (429, 503, 504 and connection failures, on the
next replica), replica rotation and envelope parsing. Prompts answered ``stored: false`` for a
reason a retry can fix are sent again; any other refusal stops the upload with the server's
message.

Every line's item carries an ``upload_id`` derived from the line (its number, prompt id and
responses), the same on every retry and on every run over the same file: the service applies
an append of an id once, so a re-run after any failure, in either mode, stores each line once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from trainer_client.baselines.records import BaselineRecord, iter_baseline_file
from trainer_client.client.replicas import Replicas
from trainer_client.client.retry import RetryPolicy
from trainer_client.client.reward_client import RewardClient, RewardServiceError
from trainer_client.progress import ProgressBar

log = logging.getLogger("crs.push")

Mode = Literal["replace", "append"]

# Reasons a prompt was not stored that another try cannot fix: Redis out of memory, or the
# prompt's key holds a value crs did not write. The others (not_ready, conflict) are retried.
_FINAL_ERRORS = frozenset({"store_full", "corrupt_entry"})

# How many failed prompts the summary lists by id; the count covers the rest.
_LISTED_FAILURES = 20

# Versions the upload id's derivation: a new scheme must not collide with ids sent before.
_UPLOAD_ID_SCHEME = "crs-push-1"


@dataclass(frozen=True, kw_only=True)
class PushOptions:
    """Where and how to upload; validated at construction.

    ``urls`` are the replicas' base URLs, taken in turn (one is enough).
    """

    urls: Sequence[str]
    token: str | None = None
    chunk_prompts: int = 64
    chunk_responses: int = 1024
    mode: Mode = "replace"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(300.0, connect=10.0))

    def __post_init__(self) -> None:
        # The client's own check (absolute http(s) URLs, none twice), before anything is read.
        Replicas(list(self.urls), 0.0)
        if self.chunk_prompts < 1:
            raise ValueError(f"chunk_prompts must be >= 1, got {self.chunk_prompts}")
        if self.chunk_responses < 1:
            raise ValueError(f"chunk_responses must be >= 1, got {self.chunk_responses}")
        if self.mode not in ("replace", "append"):
            raise ValueError(f"mode must be replace or append, got {self.mode!r}")


@dataclass(frozen=True, kw_only=True)
class PromptOutcome:
    """What became of one uploaded prompt."""

    prompt_id: str
    stored: bool
    mean: float | None = None
    error: str | None = None
    error_type: str | None = None
    duplicate: bool = False

    @property
    def worth_resending(self) -> bool:
        """Not stored, for a reason another try can fix."""
        return not self.stored and self.error_type not in _FINAL_ERRORS


@dataclass(kw_only=True)
class PushSummary:
    """Totals of one upload; ``failed`` counts every prompt of the file not stored;
    ``duplicates`` the stored ones an earlier upload of the same lines had applied already."""

    stored: int = 0
    failed: int = 0
    duplicates: int = 0
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
            self.duplicates += outcome.duplicate
            if outcome.mean is not None:
                self.means.append(outcome.mean)
        else:
            self.failed += 1
            self.failures.append(outcome)

    def line(self) -> str:
        """The one-line summary the command prints."""
        mean = "n/a" if self.mean_baseline is None else f"{self.mean_baseline:.6g}"
        models = ",".join(sorted(self.model_versions)) or "none"
        already = f" ({self.duplicates} applied by an earlier upload)" if self.duplicates else ""
        return (
            f"push-baselines: stored {self.stored} prompts{already}, failed {self.failed}, "
            f"mean baseline {mean}, model {models}, {self.elapsed_s:.1f} s"
        )


class PushError(Exception):
    """The upload cannot go on: a refusal that retrying will not fix, or retries ran out."""


def upload_id(record: BaselineRecord) -> str:
    """The upload id of one line of a baseline file: a digest of its line number, prompt id and
    responses, so that every run over the same file sends the same id for the same line (a
    re-run does not append it again) and two equal lines of a file are two uploads."""
    content = json.dumps(
        [_UPLOAD_ID_SCHEME, record.line, record.prompt_id, record.responses],
        ensure_ascii=True,
        separators=(",", ":"),
    )
    return "push-" + hashlib.sha256(content.encode("ascii")).hexdigest()[:40]


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
    client = RewardClient(
        options.urls,
        token=options.token,
        timeout=options.timeout,
        retry=options.retry,
        # One request per call: chunked() has bounded the responses already.
        chunk_size=options.chunk_responses,
        max_concurrency=1,
    )
    with client, ProgressBar(total, description="pushing", quiet=quiet) as bar:
        uploader = _Uploader(client=client, options=options, sleep=sleep, summary=summary)
        # An empty response is a real sample (the policy ended at once): it is sent as it is.
        records = iter_baseline_file(path)
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


@dataclass(kw_only=True)
class _Uploader:
    """Sends chunks through the reward client and resends the prompts it could not store."""

    client: RewardClient
    options: PushOptions
    sleep: Callable[[float], None]
    summary: PushSummary

    def put(self, chunk: Sequence[BaselineRecord]) -> list[PromptOutcome]:
        """The outcome of every prompt of the chunk, in order.

        Prompts answered ``stored: false`` for a reason a retry can fix are sent again (only
        they: the others are stored) until the policy's retries are spent. Their upload ids do
        not change, so a prompt stored by a try whose answer was lost is not stored twice.

        Raises:
            PushError: on a refusal that retrying will not fix, or when retries ran out.
        """
        items = [{**record.to_json(), "upload_id": upload_id(record)} for record in chunk]
        outcomes: dict[int, PromptOutcome] = {}
        pending = list(range(len(chunk)))
        retry = 0
        while True:
            sent = self._send([items[i] for i in pending])
            for position, outcome in zip(pending, sent, strict=True):
                outcomes[position] = outcome
            pending = [i for i in pending if outcomes[i].worth_resending]
            if not pending or retry >= self.options.retry.retries:
                return [outcomes[i] for i in range(len(chunk))]
            log.warning("%d prompt(s) not stored; retrying them", len(pending))
            self.sleep(self.options.retry.delay_s(retry))
            retry += 1

    def _send(self, items: Sequence[dict[str, Any]]) -> list[PromptOutcome]:
        """One ``push_baselines`` of ``items`` (retried inside the client); a 413 on several
        items sends each half on its own."""
        try:
            answer = self.client.push_baselines(items, self.options.mode)
        except RewardServiceError as error:
            if error.status == 413 and len(items) > 1:
                half = len(items) // 2
                return self._send(items[:half]) + self._send(items[half:])
            raise PushError(str(error)) from error
        for result in answer.results:
            self.summary.model_versions.add(result.model_version)
        return [
            PromptOutcome(
                prompt_id=r.prompt_id,
                stored=r.stored,
                mean=r.mean if r.stored else None,
                error=r.error,
                error_type=r.error_type,
                duplicate=r.duplicate,
            )
            for r in answer.results
        ]


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
        lines.append(f"{unsent} prompt(s) were not sent")
    if summary.failed:
        # True in both modes: each line's upload id makes a stored line a no-op when resent.
        lines.append(
            "re-run the same command to upload the rest: lines already stored are not "
            "stored again, under append too"
        )
    return lines
