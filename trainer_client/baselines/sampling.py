"""Offline baseline sampling: k responses per prompt from the SFT policy (DESIGN.md 1, step 1).

``crs-trainer sample-baselines --policy DIR --prompts FILE -k 8 --out FILE`` writes one JSONL
line ``{"prompt_id", "prompt", "responses"}`` per prompt, the baseline file that
``push-baselines`` uploads and that stays the source of truth for the service's cache.

Batches are appended, flushed and fsynced one at a time, so a crash loses at most the batch in
flight, and a re-run resumes: prompts already in the output are skipped. torch and
transformers are imported inside functions, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from trainer_client.baselines.records import PromptLine, PromptValue, RecordError, read_prompt_file
from trainer_client.progress import ProgressBar

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]


class PolicyError(ValueError):
    """The policy cannot be loaded or run where it was asked to."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to sample the baseline responses; validated at construction."""

    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8
    device: Device = "auto"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingSummary:
    """What a run did: prompts sampled now, prompts skipped (done before or repeated)."""

    sampled: int
    skipped: int
    out: Path
    elapsed_s: float

    def line(self) -> str:
        """The one-line summary the command prints."""
        return (
            f"sample-baselines: sampled {self.sampled} prompts, skipped {self.skipped} "
            f"(already in the output or repeated), wrote {self.out} in {self.elapsed_s:.1f} s"
        )


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A loaded causal LM, its tokenizer (left padding) and the device it runs on."""

    model: Any
    tokenizer: Any
    device: torch.device


@dataclass(frozen=True, kw_only=True)
class Pending:
    """A prompt still to sample and its position in the prompt file (0-based, for seeds)."""

    index: int
    prompt: PromptLine


def sample_baselines(
    policy_dir: Path,
    prompts_path: Path,
    out: Path,
    config: SamplingConfig,
    *,
    quiet: bool = False,
) -> SamplingSummary:
    """Sample ``config.k`` responses for every prompt of ``prompts_path`` not yet in ``out``.

    The prompt file is read and checked whole before the policy loads (prompts are small next
    to the model), so a bad line costs seconds, not a half-finished run.

    Raises:
        RecordError: a line of the prompt file or of an existing output is unusable.
        PolicyError: the policy cannot be loaded, or not on the device asked for.
    """
    started = time.monotonic()
    prompts = read_prompt_file(prompts_path)
    done = resume_output(out)
    pending = pending_prompts(prompts, done)
    if pending:
        policy = load_policy(policy_dir, config.device)
        out.parent.mkdir(parents=True, exist_ok=True)
        with (
            out.open("a", encoding="utf-8") as sink,
            ProgressBar(len(pending), description="sampling", quiet=quiet) as bar,
        ):
            for batch in batched(pending, config.batch_size):
                seed = batch_seed(config.seed, batch[0].index)
                responses = sample_batch(policy, [p.prompt.prompt for p in batch], config, seed)
                append_batch(sink, [p.prompt for p in batch], responses)
                bar.update(len(batch))
    return SamplingSummary(
        sampled=len(pending),
        skipped=len(prompts) - len(pending),
        out=out,
        elapsed_s=time.monotonic() - started,
    )


def resume_output(out: Path) -> set[str]:
    """The prompt ids already in ``out``; a truncated last line (a crash mid-write) is cut off.

    Only text after the last newline can be a partial write, since every batch is written
    newline-terminated and fsynced; a broken line before it is real corruption and raises.
    """
    if not out.exists():
        return set()
    done: set[str] = set()
    complete_bytes = 0
    with out.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if not raw.endswith(b"\n"):
                break
            complete_bytes += len(raw)
            if raw.strip():
                done.add(_output_prompt_id(raw, f"{out}:{line_number}"))
    if complete_bytes < out.stat().st_size:
        # Rewrite cleanly: the next append then starts on a line of its own.
        with out.open("rb+") as handle:
            handle.truncate(complete_bytes)
    return done


def _output_prompt_id(raw: bytes, where: str) -> str:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RecordError(f"{where}: existing output line is corrupt; fix or remove it") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt_id"), str):
        raise RecordError(f"{where}: existing output line has no 'prompt_id'")
    prompt_id: str = record["prompt_id"]
    return prompt_id


def pending_prompts(prompts: Sequence[PromptLine], done: set[str]) -> list[Pending]:
    """The prompts to sample: not in ``done``, and each prompt id once.

    A repeated prompt is sampled once (its baseline is per prompt, not per line); the same id
    given to two different prompts is refused, since one of them would get the other's baseline.
    """
    first_seen: dict[str, PromptLine] = {}
    pending: list[Pending] = []
    for index, prompt in enumerate(prompts):
        seen = first_seen.setdefault(prompt.prompt_id, prompt)
        if seen is not prompt:
            if seen.prompt != prompt.prompt:
                raise RecordError(
                    f"lines {seen.line} and {prompt.line}: prompt_id {prompt.prompt_id!r} "
                    "names two different prompts"
                )
            continue
        if prompt.prompt_id not in done:
            pending.append(Pending(index=index, prompt=prompt))
    return pending


def batched(pending: Sequence[Pending], size: int) -> Iterator[Sequence[Pending]]:
    """Consecutive batches of at most ``size`` prompts."""
    for start in range(0, len(pending), size):
        yield pending[start : start + size]


def batch_seed(seed: int, first_index: int) -> int:
    """The seed of a batch, from the run's seed and the file position of its first prompt.

    Hashed rather than added, so that (seed 1, prompt 0) and (seed 0, prompt 1) differ.
    """
    digest = hashlib.sha256(f"{seed}:{first_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds must fit in an int64


def append_batch(sink: IO[str], prompts: Sequence[PromptLine], responses: list[list[str]]) -> None:
    """Append one line per prompt and make it durable before the next batch starts."""
    lines = [
        json.dumps(
            {"prompt_id": p.prompt_id, "prompt": p.prompt, "responses": r}, ensure_ascii=False
        )
        + "\n"
        for p, r in zip(prompts, responses, strict=True)
    ]
    sink.write("".join(lines))
    sink.flush()
    os.fsync(sink.fileno())


def resolve_device(device: Device) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is refused."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PolicyError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def load_policy(path: Path, device: Device) -> Policy:
    """Load a local causal LM directory for batched sampling (left padding, a pad token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # The checkpoint's own dtype on a GPU; fp32 on CPU, where half precision is slow.
        dtype = "auto" if target.type == "cuda" else torch.float32
        # Any: transformers' annotations of to()/eval() do not fit every model class.
        model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as error:
        # What transformers raises for a directory that is not a causal LM checkpoint.
        raise PolicyError(f"cannot load a causal LM from {path}: {error}") from error
    # Decoder-only generation continues from the last position: padding must go on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PolicyError(f"the tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.to(target)
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, device=target)


def prompt_text(tokenizer: Any, prompt: PromptValue) -> str:
    """The text the policy continues: its chat template with the generation prompt when it has
    one (a string is one user message), else the raw string or ``role: content`` lines."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text: str = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def encode_prompts(policy: Policy, prompts: Sequence[PromptValue]) -> Any:
    """The prompts as the policy continues them (``prompt_text``), left-padded on its device:
    the baseline sampler and the PPO trainer render a prompt the same way, so the policy's
    rollouts continue the very text its baselines were sampled from."""
    tokenizer = policy.tokenizer
    templated = bool(getattr(tokenizer, "chat_template", None))
    texts = [prompt_text(tokenizer, prompt) for prompt in prompts]
    # A chat template writes its own BOS; adding special tokens again would double it.
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return inputs.to(policy.device)


def sample_batch(
    policy: Policy, prompts: Sequence[PromptValue], config: SamplingConfig, seed: int
) -> list[list[str]]:
    """``config.k`` sampled responses for each prompt, in one ``generate`` call."""
    import torch

    tokenizer = policy.tokenizer
    inputs = encode_prompts(policy, prompts)
    with torch.random.fork_rng(devices=_rng_devices(policy.device)), torch.inference_mode():
        torch.manual_seed(seed)
        output = policy.model.generate(
            **inputs,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            # transformers falls back to top_k=50 when unset: 0 samples the policy's whole
            # distribution (as PPO rollouts do), cut only by temperature and top_p.
            top_k=0,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.k,
            pad_token_id=tokenizer.pad_token_id,
        )
    # Left padding puts every prompt's end at the same column: the rest is new tokens.
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    decoded: list[str] = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    # generate repeats each prompt k times in a row: rows [i*k, (i+1)*k) belong to prompt i.
    return [decoded[i * config.k : (i + 1) * config.k] for i in range(len(prompts))]


def _rng_devices(device: torch.device) -> list[int]:
    # fork_rng restores the caller's generators afterwards; on CUDA that includes the GPU one.
    if device.type != "cuda":
        return []
    import torch

    return [device.index if device.index is not None else torch.cuda.current_device()]
