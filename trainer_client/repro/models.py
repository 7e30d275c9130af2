"""The models of the reproduction: a word-level tokenizer, a tiny SFT policy and proxy RMs.

Everything is trained from scratch on the gold-reward task (``task``), small enough that the
whole set builds in about two minutes on two CPU cores and PPO on the policy runs in seconds:

- the tokenizer has one token per task word. A prompt alone encodes as ``[BOS] prompt [SEP]``
  (what the policy continues), a pair as ``[BOS] prompt [SEP] response [EOS]`` (what crs
  scores: the text pair of a tokenizer without a chat template);
- the SFT policy is a tiny ``LlamaForCausalLM`` trained on SFT-like responses
  (``GoldTask.sft_response``), so sampling it gives task-shaped text ending at ``[EOS]``;
- a proxy reward model is a tiny ``LlamaForSequenceClassification`` trained Bradley-Terry on
  gold-labelled pairs with a fraction of the labels flipped (the paper's noisy RM), saved so
  that ``crs-service serve --model DIR`` loads it.

``build_assets`` builds all of it under one directory and reuses what its manifest says was
built with the same settings. torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_client.progress import ProgressBar
from trainer_client.repro.task import GoldTask, PreferencePair, default_task, flip_labels

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]")
# Prompts are under 10 words and responses under 20: 128 positions leave room for PPO's
# longest rollouts, and anything longer is cut by the service's left truncation.
MAX_TOKENS = 128

SFT_STEPS = 200
SFT_BATCH = 64
SFT_LEARNING_RATE = 3e-3
RM_PAIRS = 12000
RM_STEPS = 200
RM_BATCH = 128
RM_LEARNING_RATE = 2e-3
RM_P_PERTURBED = 0.35
HELDOUT_PAIRS = 1000
TRAIN_PROMPTS = 512
MANIFEST = "manifest.json"
# Bumped when what a component is built from changes in code, so old caches are not reused.
BUILD_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class ProxyRM:
    """A trained proxy reward model: its directory, its label noise, and how often it orders
    clean held-out pairs as gold does."""

    path: Path
    flip_fraction: float
    heldout_agreement: float


@dataclass(frozen=True, kw_only=True)
class TaskAssets:
    """What the comparison needs: the task, its models and the prompt files (JSONL)."""

    task: GoldTask
    tokenizer: Path
    sft: Path
    rms: dict[float, ProxyRM]
    train_prompts: Path
    eval_prompts: Path


def build_tokenizer(task: GoldTask, out_dir: Path) -> Path:
    """Save a word-level tokenizer of the task's words to ``out_dir`` (``save_pretrained``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *task.words()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # Split on whitespace only, as the gold reward does: a word with punctuation is unknown.
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [SEP]",
        pair="[BOS] $A [SEP] $B:1 [EOS]:1",
        special_tokens=[(t, vocab[t]) for t in ("[BOS]", "[SEP]", "[EOS]")],
    )
    # No decoder: tokens are joined with single spaces, which is the task's text exactly.
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        sep_token="[SEP]",
        model_max_length=MAX_TOKENS,
        # Llama takes no token types: a tokenizer that returned them would break its forward.
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def train_sft_policy(
    task: GoldTask,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = SFT_STEPS,
    quiet: bool = False,
) -> Path:
    """Train the tiny SFT policy on ``[BOS] prompt [SEP] sft_response [EOS]`` and save it.

    The loss covers the response and its ``[EOS]`` only: the policy is never asked to write
    prompts. Saved with its tokenizer and a generation config (eos ``[EOS]``, pad ``[PAD]``),
    it loads with ``load_policy`` and samples task-shaped responses that stop at ``[EOS]``.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = _load_tokenizer(tokenizer_dir)
    rng = random.Random(f"sft-data:{seed}")
    prompts = task.prompts(steps * SFT_BATCH, seed)
    responses = [task.sft_response(rng, prompt) for prompt in prompts]
    ids = tokenizer(prompts, responses)["input_ids"]
    with _seeded(seed):
        # Any: transformers' annotations of train()/eval() do not fit every model class.
        model: Any = LlamaForCausalLM(_llama_config(tokenizer))
        optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LEARNING_RATE)
        schedule = _warmup_linear_decay(optimizer, steps)
        model.train()
        with ProgressBar(steps, description="sft policy", quiet=quiet) as bar:
            for step in range(steps):
                rows = ids[step * SFT_BATCH : (step + 1) * SFT_BATCH]
                batch = _lm_batch(rows, tokenizer.pad_token_id, tokenizer.sep_token_id)
                loss = model(**batch).loss
                _step(model, optimizer, schedule, loss)
                bar.update(1)
    model.eval()
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _save(model, tokenizer, out_dir, quiet=quiet)
    return out_dir


def train_proxy_rm(
    task: GoldTask,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    flip_fraction: float,
    seed: int = 0,
    pairs: int = RM_PAIRS,
    steps: int = RM_STEPS,
    quiet: bool = False,
) -> ProxyRM:
    """Train a proxy reward model Bradley-Terry on gold-labelled pairs, ``flip_fraction`` of
    them mislabelled, and save it where ``crs-service serve --model`` can load it.

    The pairs are the same for every noise level with the same seed (only the flips differ),
    and the held-out pairs are clean: ``heldout_agreement`` is how often the model orders them
    as gold does.
    """
    import torch
    from transformers import LlamaForSequenceClassification

    tokenizer = _load_tokenizer(tokenizer_dir)
    training = flip_labels(
        task.preference_pairs(pairs, seed, p_perturbed=RM_P_PERTURBED), flip_fraction, seed
    )
    chosen = _pair_ids(tokenizer, training, chosen=True)
    rejected = _pair_ids(tokenizer, training, chosen=False)
    with _seeded(seed):
        model: Any = LlamaForSequenceClassification(  # type: ignore[no-untyped-call]
            _llama_config(tokenizer, reward_head=True)
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=RM_LEARNING_RATE, weight_decay=0.01)
        schedule = _warmup_linear_decay(optimizer, steps)
        order = _batch_order(len(training), steps, RM_BATCH, seed)
        model.train()
        with ProgressBar(
            steps, description=f"proxy rm (flip {flip_fraction:g})", quiet=quiet
        ) as bar:
            for rows in order:
                scores = _rewards(
                    model,
                    [chosen[i] for i in rows] + [rejected[i] for i in rows],
                    tokenizer.pad_token_id,
                )
                margin = scores[: len(rows)] - scores[len(rows) :]
                loss = -torch.nn.functional.logsigmoid(margin).mean()
                _step(model, optimizer, schedule, loss)
                bar.update(1)
    model.eval()
    agreement = heldout_agreement(task, model, tokenizer, seed=seed)
    _save(model, tokenizer, out_dir, quiet=quiet)
    return ProxyRM(path=out_dir, flip_fraction=flip_fraction, heldout_agreement=agreement)


def heldout_agreement(
    task: GoldTask, model: Any, tokenizer: Any, *, seed: int, pairs: int = HELDOUT_PAIRS
) -> float:
    """The fraction of clean pairs (drawn apart from any training pairs of ``seed``) that
    ``model`` scores in gold's order."""
    import torch

    heldout = task.preference_pairs(pairs, _heldout_seed(seed), p_perturbed=RM_P_PERTURBED)
    chosen = score_pairs(model, tokenizer, [(p.prompt, p.chosen) for p in heldout])
    rejected = score_pairs(model, tokenizer, [(p.prompt, p.rejected) for p in heldout])
    return round(float((torch.tensor(chosen) > torch.tensor(rejected)).float().mean()), 4)


def score_pairs(
    model: Any, tokenizer: Any, items: Sequence[tuple[str, str]], *, batch_size: int = 256
) -> list[float]:
    """Rewards of ``(prompt, response)`` items, encoded as crs encodes them (the text pair)."""
    import torch

    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            ids = tokenizer([p for p, _ in chunk], [r for _, r in chunk])["input_ids"]
            scores += _rewards(model, ids, tokenizer.pad_token_id).tolist()
    return scores


def build_assets(
    workdir: Path,
    *,
    noise_levels: Sequence[float] = (0.0, 0.2, 0.4),
    seed: int = 0,
    quiet: bool = False,
    task: GoldTask | None = None,
    train_prompts: int = TRAIN_PROMPTS,
    sft_steps: int = SFT_STEPS,
    rm_steps: int = RM_STEPS,
    rm_pairs: int = RM_PAIRS,
) -> TaskAssets:
    """Build (or reuse) the tokenizer, the SFT policy, one proxy RM per noise level and the
    prompt files under ``workdir``.

    A part is reused when ``workdir/manifest.json`` records it built from the same settings
    (task, seed, sizes, and the parts it depends on); any other part is rebuilt, so a new
    noise level trains only its RM. The train prompts are ``train_prompts`` draws of the seed;
    the eval prompts are every distinct prompt of the task, once each.
    """
    task = task or default_task()
    cache = _Manifest(workdir)
    base = {"format": BUILD_FORMAT, "task": _digest(repr(task)), "seed": seed}

    tokenizer_key = _digest({**base, "part": "tokenizer"})
    tokenizer = cache.part(
        "tokenizer", tokenizer_key, lambda out: _built(build_tokenizer(task, out))
    )

    sft_key = _digest({**base, "part": "sft", "steps": sft_steps, "tokenizer": tokenizer_key})
    sft = cache.part(
        "sft",
        sft_key,
        lambda out: _built(
            train_sft_policy(task, tokenizer, out, seed=seed, steps=sft_steps, quiet=quiet)
        ),
    )

    rms: dict[float, ProxyRM] = {}
    for flip in noise_levels:
        settings = {"flip": flip, "pairs": rm_pairs, "steps": rm_steps}
        rm_key = _digest({**base, "part": "rm", **settings, "tokenizer": tokenizer_key})

        def train(out: Path, flip: float = flip) -> dict[str, Any]:
            rm = train_proxy_rm(
                task,
                tokenizer,
                out,
                flip_fraction=flip,
                seed=seed,
                pairs=rm_pairs,
                steps=rm_steps,
                quiet=quiet,
            )
            return {"heldout_agreement": rm.heldout_agreement}

        name = f"rm-flip{flip:.2f}"
        path = cache.part(name, rm_key, train)
        agreement = float(cache.entry(name)["heldout_agreement"])
        rms[flip] = ProxyRM(path=path, flip_fraction=flip, heldout_agreement=agreement)

    train_file, eval_file = workdir / "train_prompts.jsonl", workdir / "eval_prompts.jsonl"
    _write_prompts(train_file, task.prompts(train_prompts, seed))
    _write_prompts(eval_file, task.all_prompts())
    return TaskAssets(
        task=task,
        tokenizer=tokenizer,
        sft=sft,
        rms=rms,
        train_prompts=train_file,
        eval_prompts=eval_file,
    )


class _Manifest:
    """``workdir/manifest.json``: for each part built, the key of its settings and what its
    build measured. A part is written to a scratch directory and moved in place before the
    manifest names it, so an interrupted build is never mistaken for a finished one."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.path = workdir / MANIFEST
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            loaded = {}
        parts = loaded.get("parts") if isinstance(loaded, dict) else None
        self.parts: dict[str, dict[str, Any]] = parts if isinstance(parts, dict) else {}

    def entry(self, name: str) -> dict[str, Any]:
        """What the manifest records of a part."""
        return self.parts[name]

    def part(self, name: str, key: str, build: Callable[[Path], dict[str, Any]]) -> Path:
        """The directory of part ``name``: reused when built with ``key``, else built now."""
        target = self.workdir / name
        entry = self.parts.get(name)
        if entry is not None and entry.get("key") == key and target.is_dir():
            return target
        scratch = self.workdir / f"{name}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        started = time.monotonic()
        measured = build(scratch)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
        self.parts[name] = {"key": key, "build_s": round(time.monotonic() - started, 2), **measured}
        self._save()
        return target

    def _save(self) -> None:
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps({"parts": self.parts}, indent=2) + "\n", encoding="utf-8")
        os.replace(scratch, self.path)


def _built(_: Path) -> dict[str, Any]:
    # A part whose build measures nothing beyond its time.
    return {}


def _digest(settings: object) -> str:
    text = json.dumps(settings, sort_keys=True) if not isinstance(settings, str) else settings
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_prompts(path: Path, prompts: Sequence[str]) -> None:
    lines = "".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts)
    path.write_text(lines, encoding="utf-8")


def _save(model: Any, tokenizer: Any, out_dir: Path, *, quiet: bool) -> None:
    """Save a model (safetensors) and its tokenizer; quiet silences transformers' bars too."""
    from transformers.utils import logging as hf_logging

    out_dir.mkdir(parents=True, exist_ok=True)
    silence = quiet and hf_logging.is_progress_bar_enabled()
    if silence:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if silence:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _heldout_seed(seed: int) -> int:
    # Negative: never the seed of any build's training pairs, which are drawn from seed >= 0.
    return -1 - seed


def _load_tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def _llama_config(tokenizer: Any, *, reward_head: bool = False) -> Any:
    """The shape of every model here: 2 layers of width 64, ~100k parameters."""
    from transformers import LlamaConfig

    extra: dict[str, Any] = {}
    if reward_head:
        # One label, named: crs reads num_labels from id2label and serves logit 0.
        extra = {"id2label": {0: "reward"}, "label2id": {"reward": 0}}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Wider than the usual 0.02: at width 64 that start trains several times faster here
        # (held-out agreement after 200 steps: 0.79 against 0.71 for the same RM).
        initializer_range=0.1,
        **extra,
    )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for weights and dropout without moving the caller's global generator."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _warmup_linear_decay(optimizer: Any, steps: int) -> Any:
    import torch

    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.05, (steps - step) / steps))
    )


def _step(model: Any, optimizer: Any, schedule: Any, loss: torch.Tensor) -> None:
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()


def _lm_batch(rows: Sequence[Sequence[int]], pad_id: int, sep_id: int) -> dict[str, torch.Tensor]:
    """A right-padded LM batch whose labels are the tokens after ``[SEP]`` (-100 elsewhere)."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        start = list(row).index(sep_id) + 1
        labels[i, start : len(row)] = torch.tensor(row[start:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pair_ids(tokenizer: Any, pairs: Sequence[PreferencePair], *, chosen: bool) -> list[list[int]]:
    responses = [p.chosen if chosen else p.rejected for p in pairs]
    ids: list[list[int]] = tokenizer([p.prompt for p in pairs], responses)["input_ids"]
    return ids


def _batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """``steps`` batches of indices, in epochs of one seeded shuffle each."""
    rng = random.Random(f"batches:{seed}")
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def _rewards(model: Any, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The reward model's scores of right-padded rows (it pools at the last non-pad token)."""
    import torch

    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    scores: torch.Tensor = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    return scores
