"""Client side of crs: what PPO trainers install. Never imports torch or the service."""

from trainer_client.prompt_id import canonical_prompt, prompt_id

__all__ = ["canonical_prompt", "prompt_id"]
