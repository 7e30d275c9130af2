"""A tiny random-weight causal LM to stand in for an SFT policy in tests, demos and smoke runs.

Nothing can be downloaded where the tests run, so the policy is built from scratch: a small
``LlamaForCausalLM`` with seeded random weights, and a real tokenizer with a chat template. The
tokenizer is taken from a model directory given by the caller, or else from a tiny reward model
that ``python -m service tiny-model`` builds in a temporary directory: ``trainer_client`` never
imports ``service``, so it runs it as a command, as the demo does. The result is saved like any
Hugging Face checkpoint and loads with ``AutoModelForCausalLM`` and ``AutoTokenizer``.

torch and transformers are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# Llama-style turns, as the tiny reward model's: bos, then "<|role|>\n{content}{eos}\n" per
# message. Used only when the tokenizer given has no template of its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TinyPolicyError(Exception):
    """The policy could not be built as asked (target not empty, no usable tokenizer)."""


def build_tiny_policy(out_dir: Path, *, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` and its tokenizer into ``out_dir``.

    Args:
        out_dir: target directory; created if missing, refused if it exists and is not empty.
        tokenizer_dir: a model directory whose tokenizer to use. None: the tokenizer of a tiny
            reward model built by ``python -m service tiny-model`` (needs the server extra).
        seed: seed of the random weights; the same seed and tokenizer give the same weights.

    Returns:
        ``out_dir``.

    Raises:
        TinyPolicyError: ``out_dir`` is not an empty directory, or no tokenizer could be had.
    """
    _check_out_dir(out_dir)
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="crs-tiny-policy-") as scratch:
            tokenizer = load_tokenizer(_build_reward_model(Path(scratch) / "rm"))
    _complete_tokenizer(tokenizer)
    model = random_llama(tokenizer, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved in ``model_dir``, from local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise TinyPolicyError(f"no tokenizer could be loaded from {model_dir}: {error}") from None


def _check_out_dir(out_dir: Path) -> None:
    # Files of two checkpoints mixed in one directory would load, and be silently wrong.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TinyPolicyError(f"{out_dir} exists and is not an empty directory")


def _build_reward_model(model_dir: Path) -> Path:
    """A tiny llama reward model in ``model_dir``, made by the service's own command."""
    command = [sys.executable, "-m", "service", "tiny-model", str(model_dir), "--arch", "llama"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise TinyPolicyError(
            "building a tokenizer with `python -m service tiny-model` failed (it needs the "
            f"server extra; or pass a tokenizer directory):\n{tail}"
        )
    return model_dir


def _complete_tokenizer(tokenizer: Any) -> None:
    """Give the tokenizer what generation and chat need: eos, pad and a chat template."""
    if tokenizer.eos_token is None:
        raise TinyPolicyError("the tokenizer has no eos token: generation could never stop")
    if tokenizer.pad_token is None:
        # Batched generation pads; eos is the usual stand-in for causal LMs without a pad.
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE


def random_llama(tokenizer: Any, seed: int) -> Any:
    """A small random LlamaForCausalLM for ``tokenizer``, the same for the same ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # Small enough to train a few steps on two CPU cores in seconds, yet a real decoder:
    # several layers and heads, rotary positions, a context long enough for chat prompts.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A forked generator: building a policy must not move the caller's global torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
