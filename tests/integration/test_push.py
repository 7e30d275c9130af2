"""`crs-trainer push-baselines` against a real uvicorn server speaking PUT /v1/baselines.

The fake service validates every body with the service's own request schema and answers with
its response schema, so the client is held to the wire format; it applies an append's upload
id once per prompt, as the service does, and can be told to refuse the first calls (429 with
Retry-After, 503, 504, 413, 422, 507, a prompt answered stored: false, or an append applied
and then answered 503 or 504 as if its reply were lost).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.api.schemas import (
    BaselinesPut,
    BaselinesPutResponse,
    BaselineStored,
    ModelRef,
)
from trainer_client.baselines.push import PushOptions, PushSummary, failure_report, push_baselines
from trainer_client.cli import main
from trainer_client.client.retry import RetryPolicy
from trainer_client.launch import free_port
from trainer_client.prompt_id import prompt_id

# Retries in tests wait milliseconds, except where a Retry-After says otherwise.
FAST_RETRY = RetryPolicy(retries=4, base_s=0.01, max_s=0.02)
REFUSALS = {
    "429": (429, "overloaded", {"Retry-After": "1"}),
    "503": (503, "not_ready", {}),
    "504": (504, "timeout", {}),
    "413": (413, "payload_too_large", {}),
    "422": (422, "validation_error", {}),
    "507": (507, "store_full", {}),
}
# Applied, then answered with the refusal: the request took effect but its answer was lost.
LOST_ANSWERS = {"lost-503": "503", "lost-504": "504"}
UNSTORED_ERROR = "store unavailable (test)"
RERUN_ADVICE = (
    "re-run the same command to upload the rest: lines already stored are not stored again, "
    "under append too"
)

RECORDS: list[dict[str, Any]] = [
    {"prompt_id": "p0", "prompt": "What is 2 + 2?", "responses": ["4"]},
    {"prompt_id": "p1", "prompt": "Name a colour.", "responses": ["red", "green blue"]},
    {"prompt": "No id given.", "responses": ["a", "bb", "ccc"]},
    {
        "prompt": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi?"},
        ],
        "responses": ["hey", "hello", "yo", "hi there"],
    },
    {"prompt_id": "p4", "prompt": "Count.", "responses": ["1", "12", "123", "1234", "12345"]},
    {"prompt_id": "p5", "prompt": "Six answers.", "responses": ["x" * n for n in range(1, 7)]},
    {"prompt_id": "p6", "prompt": "One more.", "responses": ["z"]},
    {"prompt_id": "p7", "prompt": "Last.", "responses": ["end", "fin"]},
]
IDS = [prompt_id(r["prompt"], r.get("prompt_id")) for r in RECORDS]


def reward(response: str) -> float:
    """The fake reward model: the length of the response, easy to check by hand."""
    return float(len(response))


@dataclass
class Call:
    at: float
    body: dict[str, Any]


@dataclass
class FakeService:
    """PUT /v1/baselines with a scripted list of refusals for the first calls."""

    plan: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    store: dict[str, list[str]] = field(default_factory=dict)
    applied: dict[str, set[str]] = field(default_factory=dict)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.put("/v1/baselines")
        async def put_baselines(request: Request) -> JSONResponse:
            body = await request.json()
            self.calls.append(Call(at=time.monotonic(), body=body))
            step = self.plan.pop(0) if self.plan else "ok"
            if step in LOST_ANSWERS:
                self.answer(body, unstored=False)
                step = LOST_ANSWERS[step]
            if step in REFUSALS:
                status, error_type, headers = REFUSALS[step]
                message = f"refused with {status} (test)"
                envelope = {"error": {"type": error_type, "message": message, "details": None}}
                return JSONResponse(envelope, status_code=status, headers=headers)
            unstored = step in ("unstored", "unstored-full")
            why = "store_full" if step == "unstored-full" else None
            answer = self.answer(body, unstored=unstored, error_type=why)
            return JSONResponse(answer.model_dump())

        return app

    def answer(
        self, body: dict[str, Any], *, unstored: bool, error_type: str | None = None
    ) -> BaselinesPutResponse:
        request = BaselinesPut.model_validate(body)
        ids = [prompt_id(item.prompt_value(), item.prompt_id) for item in request.items]
        assert len(set(ids)) == len(ids), "the service refuses a prompt twice in one request"
        results = []
        for i, item in enumerate(request.items):
            pid = prompt_id(item.prompt_value(), item.prompt_id)
            if unstored and i == 0:
                results.append(
                    BaselineStored(
                        prompt_id=pid,
                        n=0,
                        mean=0,
                        std=0,
                        min=0,
                        max=0,
                        stored=False,
                        error=UNSTORED_ERROR,
                        error_type=error_type,
                    )
                )
                continue
            applied = self.applied.setdefault(pid, set())
            duplicate = request.mode == "append" and item.upload_id in applied
            if item.upload_id is not None:
                applied.add(item.upload_id)
            if not duplicate:
                kept = self.store.get(pid, []) if request.mode == "append" else []
                self.store[pid] = kept + item.responses
            rewards = [reward(r) for r in self.store[pid]]
            results.append(
                BaselineStored(
                    prompt_id=pid,
                    n=len(rewards),
                    mean=statistics.fmean(rewards),
                    std=statistics.pstdev(rewards),
                    min=min(rewards),
                    max=max(rewards),
                    stored=True,
                    duplicate=duplicate,
                    upload_id=item.upload_id,
                )
            )
        failed = sum(not r.stored for r in results)
        return BaselinesPutResponse(
            model=ModelRef(name="fake", version="fake@1"),
            stored=len(results) - failed,
            failed=failed,
            results=results,
        )

    def sent_ids(self) -> list[str]:
        return [item["prompt_id"] for call in self.calls for item in call.body["items"]]


@contextlib.contextmanager
def serving(app: FastAPI, port: int) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1:port in a thread, stopped on exit."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", loop="asyncio"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def push(path: Path, url: str, **options: Any) -> PushSummary:
    options.setdefault("retry", FAST_RETRY)
    return push_baselines(path, PushOptions(urls=[url], **options), quiet=True)


def expected_mean_of_means(records: list[dict[str, Any]]) -> float:
    return statistics.fmean(statistics.fmean(map(reward, r["responses"])) for r in records)


@pytest.mark.parametrize(
    ("chunk_prompts", "chunk_responses"), [(64, 1024), (2, 1024), (64, 5), (3, 4), (1, 1)]
)
def test_chunks_keep_every_prompt_once_and_in_order(
    fake: FakeService, url: str, baselines: Path, chunk_prompts: int, chunk_responses: int
) -> None:
    summary = push(baselines, url, chunk_prompts=chunk_prompts, chunk_responses=chunk_responses)

    assert summary.stored == len(RECORDS)
    assert summary.failed == 0
    assert fake.sent_ids() == IDS
    sent = [item for call in fake.calls for item in call.body["items"]]
    assert [(i["prompt"], i["responses"]) for i in sent] == [
        (r["prompt"], r["responses"]) for r in RECORDS
    ]
    for call in fake.calls:
        items = call.body["items"]
        assert call.body["mode"] == "replace"
        assert len(items) <= chunk_prompts
        # A prompt with more responses than the bound travels alone, never split.
        assert len(items) == 1 or sum(len(i["responses"]) for i in items) <= chunk_responses


def test_chunk_bounds_give_the_expected_requests(
    fake: FakeService, url: str, baselines: Path
) -> None:
    push(baselines, url, chunk_prompts=3, chunk_responses=6)
    sizes = [[len(i["responses"]) for i in call.body["items"]] for call in fake.calls]
    assert sizes == [[1, 2, 3], [4], [5], [6], [1, 2]]


def test_a_repeated_prompt_goes_into_the_next_request(
    fake: FakeService, url: str, tmp_path: Path
) -> None:
    # The service refuses one prompt twice in a request; in file order the later line wins.
    path = tmp_path / "baselines.jsonl"
    rows = [RECORDS[0], RECORDS[1], {**RECORDS[0], "responses": ["four"]}, RECORDS[6]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    summary = push(path, url)

    ids = [[i["prompt_id"] for i in call.body["items"]] for call in fake.calls]
    assert ids == [["p0", "p1"], ["p0", "p6"]]
    assert fake.store["p0"] == ["four"]
    assert summary.stored == 4


def test_summary_numbers_and_cli_output(
    fake: FakeService, url: str, baselines: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["push-baselines", str(baselines), "--url", url, "--chunk-prompts", "3", "--quiet"])

    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    mean = expected_mean_of_means(RECORDS)
    assert f"stored {len(RECORDS)} prompts, failed 0, mean baseline {mean:.6g}" in out[0]
    assert "model fake@1" in out[0]
    assert set(fake.store) == set(IDS)


@pytest.mark.parametrize("refusal", ["429", "503", "504"])
def test_transient_refusals_are_retried(
    fake: FakeService, url: str, baselines: Path, refusal: str
) -> None:
    fake.plan = [refusal, refusal] if refusal != "429" else [refusal]
    summary = push(baselines, url)

    assert summary.stored == len(RECORDS)
    assert summary.failed == 0
    refused = 2 if refusal != "429" else 1
    assert len(fake.calls) == refused + 1
    # The retries resend the same body.
    assert all(call.body == fake.calls[-1].body for call in fake.calls)


def test_retry_after_is_honoured(fake: FakeService, url: str, baselines: Path) -> None:
    fake.plan = ["429"]
    push(baselines, url)

    assert len(fake.calls) == 2
    retry_after = float(REFUSALS["429"][2]["Retry-After"])
    assert fake.calls[1].at - fake.calls[0].at >= retry_after


def test_a_refused_connection_is_retried_on_the_next_replica(
    fake: FakeService, url: str, baselines: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    summary = push_baselines(
        baselines, PushOptions(urls=[dead, url], retry=FAST_RETRY, chunk_prompts=3), quiet=True
    )

    assert "ConnectError" in caplog.text
    assert summary.stored == len(RECORDS)
    assert fake.sent_ids() == IDS


@pytest.mark.parametrize("form", ["repeated", "comma"])
def test_the_cli_takes_several_replicas(
    fake: FakeService, url: str, baselines: Path, form: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    urls = ["--url", dead, "--url", url] if form == "repeated" else ["--url", f"{dead}, {url}"]

    code = main(["push-baselines", str(baselines), *urls, "--chunk-prompts", "2", "--quiet"])

    assert code == 0
    assert fake.sent_ids() == IDS
    assert set(fake.store) == set(IDS)


def test_retries_run_out(fake: FakeService, url: str, baselines: Path) -> None:
    fake.plan = ["503"] * 10
    summary = push(baselines, url, retry=RetryPolicy(retries=2, base_s=0.01, max_s=0.01))

    assert len(fake.calls) == 3
    assert summary.stored == 0
    assert summary.failed == len(RECORDS)
    assert summary.fatal is not None
    assert "HTTP 503 not_ready from " in summary.fatal
    assert "refused with 503 (test) (gave up after 2 retries)" in summary.fatal


def test_a_validation_error_is_not_retried(
    fake: FakeService, url: str, baselines: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.plan = ["422"]
    code = main(["push-baselines", str(baselines), "--url", url, "--quiet"])

    assert code == 1
    assert len(fake.calls) == 1
    captured = capsys.readouterr()
    assert "HTTP 422 validation_error from " in captured.err
    assert ": refused with 422 (test)" in captured.err
    assert f"{len(RECORDS)} prompt(s) were not sent" in captured.err
    assert f"stored 0 prompts, failed {len(RECORDS)}" in captured.out


def test_stop_at_the_first_fatal_chunk(fake: FakeService, url: str, baselines: Path) -> None:
    fake.plan = ["ok", "422"]
    summary = push(baselines, url, chunk_prompts=3)

    assert len(fake.calls) == 2
    assert summary.stored == 3
    assert summary.failed == len(RECORDS) - 3


@pytest.mark.parametrize("mode", ["replace", "append"])
def test_unstored_prompts_are_sent_again_alone(
    fake: FakeService, url: str, baselines: Path, mode: str
) -> None:
    fake.plan = ["unstored"]
    summary = push(baselines, url, mode=mode)

    assert summary.stored == len(RECORDS)
    assert summary.failed == 0
    assert [len(call.body["items"]) for call in fake.calls] == [len(RECORDS), 1]
    assert fake.calls[1].body["items"][0]["prompt_id"] == IDS[0]
    # Nothing was stored twice, even under append.
    assert fake.store == {pid: r["responses"] for pid, r in zip(IDS, RECORDS, strict=True)}


def test_prompts_never_stored_are_reported(fake: FakeService, url: str, baselines: Path) -> None:
    fake.plan = ["unstored"] * 10
    summary = push(baselines, url, retry=RetryPolicy(retries=2, base_s=0.01, max_s=0.01))

    assert len(fake.calls) == 3
    assert summary.stored == len(RECORDS) - 1
    assert summary.failed == 1
    assert summary.fatal is None
    assert failure_report(summary) == [
        f"not stored: {IDS[0]}: {UNSTORED_ERROR}",
        RERUN_ADVICE,
    ]
    assert summary.mean_baseline == pytest.approx(expected_mean_of_means(RECORDS[1:]))


def test_payload_too_large_halves_the_chunk(fake: FakeService, url: str, baselines: Path) -> None:
    fake.plan = ["413"]
    summary = push(baselines, url)

    assert summary.stored == len(RECORDS)
    assert [len(call.body["items"]) for call in fake.calls] == [8, 4, 4]
    assert [i["prompt_id"] for c in fake.calls[1:] for i in c.body["items"]] == IDS


def test_rerunning_under_replace_is_idempotent(
    fake: FakeService, url: str, baselines: Path
) -> None:
    first = push(baselines, url, chunk_prompts=3)
    first_bodies = [call.body for call in fake.calls]
    store = dict(fake.store)
    fake.calls.clear()

    second = push(baselines, url, chunk_prompts=3)

    assert [call.body for call in fake.calls] == first_bodies
    assert fake.store == store
    assert (second.stored, second.failed, second.mean_baseline) == (
        first.stored,
        first.failed,
        first.mean_baseline,
    )


def test_empty_responses_are_uploaded_as_samples(
    fake: FakeService, url: str, tmp_path: Path
) -> None:
    """A policy that ends at once gives an empty response: dropping it would bias the baseline."""
    path = tmp_path / "baselines.jsonl"
    rows = [
        {"prompt_id": "some", "prompt": "a", "responses": ["", "kept"]},
        {"prompt_id": "none", "prompt": "b", "responses": [""]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    summary = push(path, url)

    assert fake.store == {"some": ["", "kept"], "none": [""]}
    assert (summary.stored, summary.failed) == (2, 0)


def test_the_token_is_sent(tmp_path: Path, baselines: Path) -> None:
    seen: list[str | None] = []
    app = FastAPI()

    @app.put("/v1/baselines")
    async def put_baselines(request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization"))
        body = await request.json()
        return JSONResponse(FakeService().answer(body, unstored=False).model_dump())

    with serving(app, free_port()) as base:
        push(baselines, base, token="s3cret")
    assert seen == ["Bearer s3cret"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.jsonl", "--url", "http://127.0.0.1:1"], "is not a file"),
        (["FILE", "--url", "127.0.0.1:8000"], "bad service URL"),
        (["FILE", "--url", "ftp://host"], "bad service URL"),
        (["FILE", "--url", "http://127.0.0.1:1,ftp://host"], "bad service URL 'ftp://host'"),
        (["FILE", "--url", "http://127.0.0.1:1,http://127.0.0.1:1"], "service URLs repeat"),
        (["FILE", "--url", ","], "at least one service URL"),
        (["FILE", "--url", "http://127.0.0.1:1", "--chunk-prompts", "0"], "chunk_prompts"),
    ],
)
def test_usage_errors_exit_2(
    baselines: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = ["push-baselines", *[str(baselines) if a == "FILE" else a for a in args]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_bad_line_is_refused_before_anything_is_sent(
    fake: FakeService, url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "baselines.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + '\n{"prompt": "x", "responses": "no"}\n')

    assert main(["push-baselines", str(path), "--url", url, "--quiet"]) == 2
    assert f"{path}:2: 'responses' must be" in capsys.readouterr().err
    assert fake.calls == []
