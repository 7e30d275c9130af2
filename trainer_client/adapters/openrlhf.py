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

When the baseline store is down, a query's reward is what the service's
``CRS_GET_REWARD_ON_UNAVAILABLE`` says: by default 0.0, the neutral value of a contrastive
reward (no improvement over the SFT baseline), never the raw reward, whose scale differs by the
baseline. Such queries are counted in ``extra_logs["baseline_unavailable"]`` (OpenRLHF logs its
mean) and in a warning of this module's logger (docs/openrlhf.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from trainer_client.client.reward_client import RewardClient

log = logging.getLogger("crs.adapters.openrlhf")
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
    warn_unavailable(answer.extra_logs.get("baseline_unavailable", []))
    return {
        "rewards": torch.tensor(answer.rewards, dtype=torch.float32),
        "scores": torch.tensor(answer.scores, dtype=torch.float32),
        "extra_logs": {
            key: torch.tensor(values, dtype=torch.float32)
            for key, values in answer.extra_logs.items()
        },
    }


def warn_unavailable(flags: Sequence[float]) -> None:
    """Log how many queries got no baseline because the store was down (their reward is the
    service's ``CRS_GET_REWARD_ON_UNAVAILABLE`` value, 0.0 by default)."""
    if count := int(sum(flags)):
        log.warning(
            "crs: the baseline store was unavailable for %d of %d queries; their reward is the "
            "service's on_unavailable value (0.0 by default)",
            count,
            len(flags),
        )
