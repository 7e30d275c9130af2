"""Fixtures of the push tests (test_push.py, test_push_idempotent.py): the fake service of
test_push.py served on a free port, and a baseline file of its records; and the Redis Cluster
of tests/redis_cluster.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_push import RECORDS, FakeService, serving
from tests.redis_cluster import own_redis_cluster, redis_cluster  # noqa: F401 - fixtures
from trainer_client.launch import free_port


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
def url(fake: FakeService) -> Iterator[str]:
    with serving(fake.app(), free_port()) as base:
        yield base


@pytest.fixture
def baselines(tmp_path: Path) -> Path:
    path = tmp_path / "baselines.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path
