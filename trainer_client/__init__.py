"""Client side of crs: what PPO trainers install. Never imports torch or the service.

The reward client is imported on first use (``from trainer_client import RewardClient``):
the service imports ``trainer_client.prompt_id``, and its install need not carry httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainer_client.prompt_id import canonical_prompt, prompt_id

if TYPE_CHECKING:
    from trainer_client.client.retry import RetryPolicy
    from trainer_client.client.reward_client import (
        AsyncRewardClient,
        EndpointNotFound,
        RewardClient,
        RewardServiceError,
    )
    from trainer_client.client.wire import (
        BaselineItem,
        BaselinesPushResult,
        BaselineStored,
        Item,
        ModelInfo,
        ModelRef,
        ModelsInfo,
        RewardResult,
    )

# Public name -> the module that defines it, imported when the name is first looked up.
_LAZY = {
    "AsyncRewardClient": "trainer_client.client.reward_client",
    "RewardClient": "trainer_client.client.reward_client",
    "RewardServiceError": "trainer_client.client.reward_client",
    "EndpointNotFound": "trainer_client.client.reward_client",
    "RetryPolicy": "trainer_client.client.retry",
    "BaselineItem": "trainer_client.client.wire",
    "BaselineStored": "trainer_client.client.wire",
    "BaselinesPushResult": "trainer_client.client.wire",
    "Item": "trainer_client.client.wire",
    "ModelInfo": "trainer_client.client.wire",
    "ModelRef": "trainer_client.client.wire",
    "ModelsInfo": "trainer_client.client.wire",
    "RewardResult": "trainer_client.client.wire",
}

__all__ = [
    "AsyncRewardClient",
    "BaselineItem",
    "BaselineStored",
    "BaselinesPushResult",
    "EndpointNotFound",
    "Item",
    "ModelInfo",
    "ModelRef",
    "ModelsInfo",
    "RetryPolicy",
    "RewardClient",
    "RewardResult",
    "RewardServiceError",
    "canonical_prompt",
    "prompt_id",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer_client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
