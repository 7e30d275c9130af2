"""The models of a PPO run: the policy, its frozen reference copy and the value head; rollouts
and the logprob/value passes over them.

The policy is any local causal LM directory (Hugging Face), loaded like the baseline sampler
loads it (``load_policy``: left padding, a pad token), so that its rollouts continue the same
prompt text the SFT baselines were sampled from. The value head is one linear layer on the
policy's last hidden state (a shared trunk, as in Ziegler et al. 2019 and InstructGPT's
reference code). torch and transformers are imported inside functions only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_client.baselines.records import PromptValue
from trainer_client.baselines.sampling import Device, Policy, encode_prompts, load_policy

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class Models:
    """The trained policy (with its tokenizer and device), the reference and the value head."""

    policy: Policy
    reference: Any
    value_head: torch.nn.Linear

    @property
    def device(self) -> torch.device:
        """Where every model of the run lives."""
        return self.policy.device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: the policy's weights and the value head's."""
        return [*self.policy.model.parameters(), *self.value_head.parameters()]


def load_models(initial: Path, device: Device, *, weights: Path | None = None) -> Models:
    """Load the policy from ``weights`` (a checkpoint's) or ``initial``, and the reference.

    The reference is always the initial policy, frozen: PPO's KL penalty keeps the policy near
    where it started, not near where a resumed run last saved it. Both run in float32: half
    precision under AdamW and probability ratios loses too much for a reference trainer.
    """
    policy = load_policy(weights or initial, device)
    policy.model.float()
    if weights is None:
        reference = copy.deepcopy(policy.model)
    else:
        reference = load_policy(initial, device).model.float()
    reference.eval()
    reference.requires_grad_(False)
    value_head = new_value_head(policy.model).to(policy.device)
    return Models(policy=policy, reference=reference, value_head=value_head)


def new_value_head(model: Any) -> torch.nn.Linear:
    """A linear value head on ``model``'s hidden size, starting at V = 0 everywhere.

    Zero weights: the critic's first estimates are neutral and the same on every run, and the
    gradient (the hidden state) still reaches every weight.
    """
    import torch

    hidden = int(model.config.hidden_size)
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """One batch of sampled responses as tensors, prompt left-padded and response right-padded.

    ``response_mask`` is 1 on each response's tokens up to and including its first EOS, 0 after.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    responses: list[str]

    @property
    def lengths(self) -> list[int]:
        """Response lengths in tokens (the EOS included)."""
        return [int(n) for n in self.response_mask.sum(dim=1).tolist()]

    def rows(self, indices: torch.Tensor) -> Rollout:
        """The rollout of the rows ``indices`` (a minibatch, or the samples kept)."""
        return Rollout(
            prompt_ids=self.prompt_ids[indices],
            prompt_mask=self.prompt_mask[indices],
            response_ids=self.response_ids[indices],
            response_mask=self.response_mask[indices],
            responses=[self.responses[int(i)] for i in indices.tolist()],
        )


def eos_token_ids(policy: Policy) -> list[int]:
    """Every token that ends a response: the generation config's EOS ids and the tokenizer's."""
    configured = getattr(policy.model.generation_config, "eos_token_id", None)
    ids = {configured} if isinstance(configured, int) else set(configured or [])
    if policy.tokenizer.eos_token_id is not None:
        ids.add(int(policy.tokenizer.eos_token_id))
    return sorted(ids)


def generate_rollout(
    policy: Policy,
    prompts: Sequence[PromptValue],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> Rollout:
    """Sample one response per prompt (stopping at EOS) with the torch RNG as it stands.

    No ``fork_rng``: the trainer seeds torch once and checkpoints its RNG state, so a resumed
    run samples what the uninterrupted one would have.
    """
    import torch

    tokenizer = policy.tokenizer
    inputs = encode_prompts(policy, prompts)
    eos = eos_token_ids(policy)
    # no_grad, not inference_mode: these ids feed the forward passes that are differentiated.
    with torch.no_grad():
        output = policy.model.generate(
            **inputs,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,  # sample the whole distribution, not transformers' default top 50
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
    prompt_width = inputs["input_ids"].shape[1]
    response_ids = output[:, prompt_width:]
    response_mask = _until_first_eos(response_ids, eos)
    response_ids = torch.where(
        response_mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id)
    )
    return Rollout(
        prompt_ids=inputs["input_ids"],
        prompt_mask=inputs["attention_mask"],
        response_ids=response_ids,
        response_mask=response_mask,
        responses=decode_responses(tokenizer, response_ids, response_mask),
    )


def _until_first_eos(response_ids: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """1.0 on every token up to and including the first EOS of its row, 0.0 after it."""
    import torch

    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device)).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).float()


def decode_responses(tokenizer: Any, response_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The text of each response, its EOS and padding left out (what crs scores)."""
    lengths = mask.sum(dim=1).long().tolist()
    rows = response_ids.tolist()
    return [
        tokenizer.decode(row[:length], skip_special_tokens=True)
        for row, length in zip(rows, lengths, strict=True)
    ]


@dataclass(frozen=True, kw_only=True)
class Scores:
    """Per response token: logprobs (B, T), values (B, T) or None, entropy (B, T) or None."""

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None


def score_rollout(
    model: Any,
    rollout: Rollout,
    *,
    temperature: float,
    value_head: torch.nn.Linear | None = None,
    entropy: bool = False,
) -> Scores:
    """One forward pass of ``model`` over prompt + response: the response tokens' logprobs,
    and the values and entropies where asked for.

    Logits are divided by the sampling temperature, so the logprobs are those of the
    distribution the responses were drawn from. Position ids follow the attention mask, as
    ``generate`` gives them to a left-padded prompt. Gradients flow unless the caller disables
    them.
    """
    import torch

    from trainer_client.ppo.algo import entropy_from_logits, logprobs_from_logits

    input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    attention = torch.cat([rollout.prompt_mask, rollout.response_mask.long()], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    output = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        output_hidden_states=value_head is not None,
        use_cache=False,
    )
    # Position i predicts token i + 1: the logits of the response tokens start one earlier.
    start = rollout.prompt_ids.shape[1] - 1
    width = rollout.response_ids.shape[1]
    logits = output.logits[:, start : start + width] / temperature
    values = None
    if value_head is not None:
        hidden = output.hidden_states[-1][:, start : start + width]
        values = value_head(hidden.float()).squeeze(-1)
    return Scores(
        logprobs=logprobs_from_logits(logits, rollout.response_ids),
        values=values,
        entropy=entropy_from_logits(logits) if entropy else None,
    )


def save_policy(models: Models, out_dir: Path) -> None:
    """The policy and its tokenizer as a Hugging Face directory that ``load_policy`` loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models.policy.model.save_pretrained(out_dir)
    models.policy.tokenizer.save_pretrained(out_dir)
