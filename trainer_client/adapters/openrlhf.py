"""OpenRLHF glue, for its custom reward function mode: ``--remote_rm_url path/to/openrlhf.py``.

OpenRLHF imports the file and calls ``reward_func(queries, prompts, labels)`` with formatted
queries (prompt + response) and prompts. This one sends them to crs's ``POST /get_reward``
through ``RewardClient`` (chunked, retried, over every replica in ``CRS_URL``) and returns what
OpenRLHF expects: ``rewards`` (contrastive where the prompt has a baseline), ``scores`` (the raw
rewards) and ``extra_logs``, as tensors.

Configure it with the environment of the OpenRLHF workers:
``CRS_URL`` (required; a comma list for several replicas) and ``CRS_API_TOKEN``. The other
mode, ``--remote_rm_url http://crs:8000/get_reward``, needs no file at all; this one adds
retries across replicas.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from trainer_client.client import RewardClient

_clients: dict[tuple[str, ...], RewardClient] = {}


def client_from_env() -> RewardClient:
    """One client per process and URL list, made on first use (OpenRLHF calls the function
    once per batch, from several Ray workers, each a process of its own)."""
    urls = tuple(url.strip() for url in os.environ.get("CRS_URL", "").split(",") if url.strip())
    if not urls:
        raise RuntimeError("set CRS_URL to the crs service, e.g. http://crs:8000")
    if urls not in _clients:
        _clients[urls] = RewardClient(list(urls), token=os.environ.get("CRS_API_TOKEN"))
    return _clients[urls]


def reward_func(
    queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any] | None = None, **_: Any
) -> dict[str, Any]:
    """OpenRLHF's custom reward function: rewards, scores and extra_logs, as tensors."""
    import torch

    answer = client_from_env().get_reward(list(queries), list(prompts))
    return {
        "rewards": torch.tensor(answer.rewards, dtype=torch.float32),
        "scores": torch.tensor(answer.scores, dtype=torch.float32),
        "extra_logs": {
            key: torch.tensor(values, dtype=torch.float32)
            for key, values in answer.extra_logs.items()
        },
    }
