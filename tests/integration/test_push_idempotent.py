"""Appends land once however they are retried: ``RewardClient.push_baselines`` and
``push-baselines`` against the fake service of test_push.py, which applies an append's
``upload_id`` once per prompt as the service does, and can apply a request and then answer 503
or 504 as if its reply had been lost."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_push import (
    FAST_RETRY,
    IDS,
    RECORDS,
    RERUN_ADVICE,
    FakeService,
)
from trainer_client import RewardClient
from trainer_client.baselines.push import PushOptions, PushSummary, failure_report, push_baselines
from trainer_client.client.retry import RetryPolicy

STORED_ONCE = {pid: r["responses"] for pid, r in zip(IDS, RECORDS, strict=True)}
PRINTABLE = set(string.printable) - set(string.whitespace) | {" "}


def append(path: Path, url: str, **options: Any) -> PushSummary:
    options.setdefault("retry", FAST_RETRY)
    return push_baselines(path, PushOptions(urls=[url], mode="append", **options), quiet=True)


def upload_ids(fake: FakeService) -> list[list[str]]:
    return [[item["upload_id"] for item in call.body["items"]] for call in fake.calls]


@pytest.mark.parametrize("lost", ["lost-503", "lost-504"])
def test_an_append_whose_answer_was_lost_is_retried_and_stored_once(
    fake: FakeService, url: str, baselines: Path, lost: str
) -> None:
    fake.plan = [lost]
    summary = append(baselines, url)

    assert (summary.stored, summary.failed, summary.fatal) == (len(RECORDS), 0, None)
    assert len(fake.calls) == 2
    assert fake.calls[1].body == fake.calls[0].body  # the same upload ids
    assert fake.store == STORED_ONCE
    # The retry found every prompt applied already.
    assert summary.duplicates == len(RECORDS)


def test_an_interrupted_append_run_again_stores_each_line_once(
    fake: FakeService, url: str, baselines: Path
) -> None:
    # The second request lands but its answer is lost, and no retry is left: the run stops.
    fake.plan = ["ok", "lost-503"]
    first = append(baselines, url, chunk_prompts=3, retry=RetryPolicy(retries=0))

    assert first.fatal is not None
    assert (first.stored, first.failed) == (3, len(RECORDS) - 3)
    assert failure_report(first)[-1] == RERUN_ADVICE

    # What the report says to do.
    second = append(baselines, url, chunk_prompts=3)

    assert (second.stored, second.failed, second.fatal) == (len(RECORDS), 0, None)
    assert second.duplicates == 6  # the two requests the first run sent
    assert fake.store == STORED_ONCE
    assert upload_ids(fake)[:2] == upload_ids(fake)[2:4]


def test_upload_ids_come_from_the_lines_and_tell_equal_lines_apart(
    fake: FakeService, url: str, tmp_path: Path
) -> None:
    path = tmp_path / "baselines.jsonl"
    # The same line twice: the file says to append it twice, so two uploads.
    rows = [RECORDS[0], RECORDS[1], RECORDS[0]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    append(path, url)
    append(path, url)

    first, second = upload_ids(fake)[:2], upload_ids(fake)[2:]
    assert [i for ids in first for i in ids] == [i for ids in second for i in ids]
    sent = [i for ids in first for i in ids]
    assert len(set(sent)) == 3
    assert all(1 <= len(i) <= 128 and set(i) <= PRINTABLE for i in sent)
    assert fake.store == {"p0": ["4", "4"], "p1": RECORDS[1]["responses"]}


def test_the_client_gives_each_item_an_upload_id_and_resends_it(
    fake: FakeService, url: str
) -> None:
    items = [
        {"prompt_id": "a", "prompt": "A?", "responses": ["x", "yy"]},
        {"prompt_id": "b", "prompt": "B?", "responses": ["z"], "upload_id": "mine-1"},
    ]
    fake.plan = ["lost-504", "lost-503"]
    with RewardClient(url, retry=FAST_RETRY) as client:
        pushed = client.push_baselines(items, mode="append")

    assert (pushed.stored, pushed.failed) == (2, 0)
    assert [r.duplicate for r in pushed.results] == [True, True]
    assert len(fake.calls) == 3
    sent = upload_ids(fake)
    assert sent[0] == sent[1] == sent[2]
    assert sent[0][1] == "mine-1"
    assert fake.store == {"a": ["x", "yy"], "b": ["z"]}


def test_two_calls_are_two_uploads(fake: FakeService, url: str) -> None:
    items = [{"prompt_id": "a", "prompt": "A?", "responses": ["x"]}]
    with RewardClient(url, retry=FAST_RETRY) as client:
        client.push_baselines(items, mode="append")
        client.push_baselines(items, mode="append")

    assert fake.store == {"a": ["x", "x"]}
    assert upload_ids(fake)[0] != upload_ids(fake)[1]


def test_store_full_is_not_retried(fake: FakeService, url: str, baselines: Path) -> None:
    fake.plan = ["507"]
    summary = append(baselines, url)

    assert len(fake.calls) == 1
    assert summary.stored == 0
    assert summary.fatal is not None
    assert "HTTP 507 store_full" in summary.fatal


def test_a_prompt_refused_as_store_full_is_not_resent(
    fake: FakeService, url: str, baselines: Path
) -> None:
    fake.plan = ["unstored-full"]
    summary = append(baselines, url)

    assert len(fake.calls) == 1
    assert (summary.stored, summary.failed) == (len(RECORDS) - 1, 1)
    assert summary.failures[0].error_type == "store_full"
