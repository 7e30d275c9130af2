"""Loading a Hugging Face reward model and running its forward pass."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from service.scoring.formatting import Formatter, resolve_input_format
from service.scoring.grouping import length_runs, padded_in_runs
from service.scoring.prefix import (
    PROBE_TOLERANCE,
    PrefixPlan,
    attention_window,
    fits_window,
    indices,
    not_a_decoder,
    pays,
    plan_prefixes,
    planned_logits,
    planned_tokens,
    probe_batch,
    probe_prefix_reuse,
)
from service.scoring.types import Encoded, ModelInfo, ModelLoadError
from service.settings import Settings

log = logging.getLogger("crs.model")

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files that do not change what the model computes stay out of the version digest.
UNHASHED_PREFIXES = ("README", ".git", "LICENSE")
DIGEST_CHARS = 12


@dataclass(frozen=True, kw_only=True)
class RewardModel:
    """One loaded model version: weights on a device, its tokenizer and formatter."""

    info: ModelInfo
    model: Any
    formatter: Formatter
    device: torch.device
    pad_token_id: int
    workers: WorkerPlan
    normalization: Normalization | None = None
    # Items sharing a prompt share the forward of its tokens (service/scoring/prefix.py):
    # decided at load, on only where a probe found it scores as the full forward does.
    prefix_reuse: bool = False
    # A right-padded batch runs without its attention mask where a probe found that this
    # gives the masked scores (causal attention: padding comes after every real token, so
    # nothing real attends to it). Without a mask SDPA takes its fused causal kernel; with
    # one, on CPU, a kernel that costs a third more per item. Decided at load.
    unmasked_padding: bool = False

    @property
    def batches_by_prompt(self) -> bool:
        """Whether the batcher should form batches by prompt, counting each prompt once: with
        reuse on, unless a sliding attention window could make the forward run such a batch
        in full (``fits_window``), far over the budget it was formed under."""
        window = attention_window(self.model.config)
        return self.prefix_reuse and (window is None or window >= 2 * self.info.max_input_tokens)

    def bind_worker_thread(self) -> None:
        """Run on each device thread before its first forward: its share of the CPU cores."""
        if self.workers.threads_each is not None:
            torch.set_num_threads(self.workers.threads_each)

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        """Raw rewards (logits, no sigmoid) of one batch, with one device-to-host copy."""
        with torch.inference_mode():
            logits = self._logits(batch)
        scores = logits[:, self.info.label_index].float()
        if self.normalization is not None:
            scores = (scores - self.normalization.mean) / self.normalization.std
        rewards: list[float] = scores.cpu().tolist()
        return rewards

    def _logits(self, batch: Sequence[Encoded]) -> torch.Tensor:
        """The pooled logits of a batch, in its order: grouped by shared prompt prefix where
        that is on and pays, else one full forward."""
        plan = self._prefix_plan(batch)
        if plan is None:
            return self.plain_logits(batch)
        return planned_logits(
            self.model,
            batch,
            plan,
            self.plain_logits,
            self.pad_token_id,
            self.device,
            unmasked_padding=self.unmasked_padding,
        )

    def plain_logits(self, batch: Sequence[Encoded]) -> torch.Tensor:
        """The pooled logits of full forwards over the right-padded batch, in its order: one
        forward, or runs of similar length where that pads fewer tokens than the extra
        forwards cost (``length_runs``; the batcher forms a batch from what is waiting, which
        may span lengths that a sort over more items would keep apart)."""
        order = sorted(range(len(batch)), key=lambda i: batch[i].length)
        runs = length_runs([batch[i].length for i in order])
        if len(runs) <= 1:
            return self._full_logits(batch)
        logits = torch.cat([self._full_logits([batch[order[n]] for n in run]) for run in runs])
        ordered = logits.new_empty(logits.shape)
        ordered[indices(order, logits.device)] = logits
        return ordered

    def _full_logits(self, batch: Sequence[Encoded]) -> torch.Tensor:
        """The pooled logits of one full forward over the right-padded batch."""
        inputs = pad_batch(
            batch, self.pad_token_id, self.device, mask_padding=not self.unmasked_padding
        )
        logits: torch.Tensor = self.model(**inputs).logits
        return logits

    def computed_tokens(self, batch: Sequence[Encoded]) -> int:
        """The tokens ``forward`` computes for ``batch``, padding included: the grouped
        forward's (``planned_tokens``) where it runs one, else those of its runs of similar
        length."""
        plan = self._prefix_plan(batch)
        if plan is not None:
            return planned_tokens(plan, batch)
        return padded_in_runs(sorted(item.length for item in batch))

    def _prefix_plan(self, batch: Sequence[Encoded]) -> PrefixPlan | None:
        if not self.prefix_reuse or len(batch) < 2:
            return None
        plan = plan_prefixes(batch, self.pad_token_id)
        if not plan.groups or not pays(plan, batch):
            return None
        if not fits_window(plan, batch, attention_window(self.model.config)):
            return None
        return plan


@dataclass(frozen=True)
class Normalization:
    """OpenRLHF's reward normalisation, from config.json: served rewards are
    ``(logit - mean) / std`` (computed in float32)."""

    mean: float
    std: float


def reward_normalization(config: Any) -> Normalization | None:
    """What OpenRLHF's reward model does with its config (``openrlhf/models/model.py``): with
    ``normalize_reward`` true, rewards are ``(reward - mean) / std``; ``mean`` and ``std``
    default to 0 and 1 when the config has no ``mean``."""
    if not getattr(config, "normalize_reward", False):
        return None
    if not hasattr(config, "mean"):
        return Normalization(mean=0.0, std=1.0)
    try:
        mean, std = float(config.mean), float(config.std)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"normalize_reward is set but mean/std are unusable: {exc}") from exc
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ModelLoadError(
            f"normalize_reward is set with mean={mean}, std={std}: std must be positive and finite"
        )
    return Normalization(mean=mean, std=std)


@dataclass(frozen=True)
class WorkerPlan:
    """How many threads run forwards side by side, and the intra-op threads each one gets
    (None: torch's own setting, as on a GPU)."""

    workers: int
    threads_each: int | None


@functools.cache
def cpu_threads() -> int:
    """torch's intra-op thread count as the process had it before any device thread took its
    share: a device thread's ``torch.set_num_threads`` becomes what threads started later read,
    so reading it at each load would halve a hot-swapped version's threads at every swap."""
    return torch.get_num_threads()


def plan_workers(requested: int | None, device: torch.device) -> WorkerPlan:
    """A GPU gets one device thread. A CPU gets two by default, each with half the cores: one
    forward's Python-side gaps and thread barriers leave cores idle that the other fills (on 2
    cores, two single-threaded forwards side by side score 15-20% more than one with both)."""
    if device.type != "cpu":
        return WorkerPlan(workers=requested or 1, threads_each=None)
    cores = cpu_threads()
    workers = requested or min(2, cores)
    return WorkerPlan(workers=workers, threads_each=max(1, cores // workers))


def pad_batch(
    batch: Sequence[Encoded],
    pad_token_id: int,
    device: torch.device,
    *,
    mask_padding: bool = True,
) -> dict[str, Any]:
    """Right-pad a batch. Right padding keeps every real token at the position it has alone,
    so a score never depends on its batch mates (left padding shifts positions). Without
    ``mask_padding`` the attention mask lets every position be seen, as if none were padding
    (``RewardModel.unmasked_padding`` says when that is exact)."""
    width = max(item.length for item in batch)
    # One tensor from padded rows (one call, not one per row: this runs on the device
    # threads, in the GIL's Python share of a forward).
    input_ids = torch.tensor(
        [item.input_ids + [pad_token_id] * (width - item.length) for item in batch],
        dtype=torch.long,
    )
    if mask_padding:
        lengths = torch.tensor([item.length for item in batch])
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    else:  # a mask of ones, not none: no "unmasked padding" warnings
        attention_mask = torch.ones((len(batch), width), dtype=torch.long)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if batch[0].token_type_ids is not None:
        inputs["token_type_ids"] = torch.tensor(
            [
                (item.token_type_ids or [0] * item.length) + [0] * (width - item.length)
                for item in batch
            ],
            dtype=torch.long,
        )
    return {name: tensor.to(device, non_blocking=True) for name, tensor in inputs.items()}


def plan_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices grouped into length-sorted batches whose padded size fits the token budget.

    An item longer than the budget alone still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted ascending, so this item sets the padded width of the batch.
        if current and (len(current) + 1) * lengths[index] > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def model_digest(path: Path) -> str:
    """A content digest of the files that decide the scores: weights, config, tokenizer.

    The version digest is ``version_digest`` of this and the serving settings."""
    sha = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.name.startswith(UNHASHED_PREFIXES):
            continue
        sha.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(8 * 1024 * 1024):
                sha.update(chunk)
    return sha.hexdigest()[:DIGEST_CHARS]


def version_digest(files_digest: str, serving: Mapping[str, Any]) -> str:
    """The digest of a model version: its files and every serving setting that changes a
    score (``serving_settings``), so replicas that score differently never share a version
    (nor the baselines cached under it)."""
    canonical = json.dumps(
        {"files": files_digest, **serving}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_CHARS]


def serving_settings(
    *,
    label_index: int,
    input_format: str,
    max_input_tokens: int,
    normalization: Normalization | None,
) -> dict[str, Any]:
    """The serving settings that change a score, as they resolve for one load.

    - ``label_index`` picks the logit; ``input_format`` decides the rendering;
    - ``max_input_tokens``: an over-long item scores differently under another limit, and
      baselines are computed with left truncation and cached under the version, so a replica
      with another limit must not read them;
    - ``normalization``: OpenRLHF's (logit - mean) / std (also in config.json, and hashed
      with it; named here so that the version says it).

    Not included: the dtype and the device (numerical precision of the same function, like a
    batch's composition) and the truncation mode (chosen per request and flagged per result).
    """
    return {
        "label_index": label_index,
        "input_format": input_format,
        "max_input_tokens": max_input_tokens,
        "normalization": None
        if normalization is None
        else {"mean": normalization.mean, "std": normalization.std},
    }


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, name)
    return dtype


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What a cheap look at a model directory found, before any weights are read."""

    config: Any
    label_index: int
    use_safetensors: bool


def preflight(path: Path, settings: Settings) -> Preflight:
    """Refuse a directory that cannot be a reward model, with a message naming the problem."""
    from transformers import AutoConfig

    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the config of {path}: {exc}") from exc
    return Preflight(
        config=config,
        label_index=check_labels(config.num_labels, settings.label_index),
        use_safetensors=check_weights(path, settings.allow_pickle_weights),
    )


def check_labels(num_labels: int, label_index: int | None) -> int:
    """The logit that is the reward: the only one, or the one the settings pick."""
    if label_index is None:
        if num_labels != 1:
            raise ModelLoadError(
                f"the model has num_labels={num_labels}; a reward model has one output. "
                "Pick the reward logit with --label-index (CRS_LABEL_INDEX; label_index when "
                "loaded through POST /admin/models)"
            )
        return 0
    if label_index >= num_labels:
        raise ModelLoadError(f"label index {label_index} is out of range: num_labels={num_labels}")
    return label_index


def check_weights(path: Path, allow_pickle: bool) -> bool:
    """True to load safetensors; pickle weights only when explicitly allowed."""
    if any((path / name).is_file() for name in SAFE_WEIGHTS):
        return True
    if any((path / name).is_file() for name in PICKLE_WEIGHTS):
        if allow_pickle:
            return False
        raise ModelLoadError(
            f"{path} has only pickle weights (pytorch_model.bin), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle-weights"
        )
    raise ModelLoadError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")


def model_max_tokens(config: Any, tokenizer: Any) -> int:
    """The longest input the model takes: the smaller of its positions and the tokenizer limit."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    # Tokenizers without a limit report a huge sentinel (about 1e30).
    sane = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 10**7]
    if not sane:
        raise ModelLoadError("the model declares no maximum length; set CRS_MAX_INPUT_TOKENS")
    return min(sane)


@dataclass(frozen=True, kw_only=True)
class Identified:
    """A model directory read as far as its version: config, tokenizer, serving settings and
    file digest, but no weights. Loading continues from here (``load_reward_model``)."""

    info: ModelInfo
    checked: Preflight
    tokenizer: Any
    normalization: Normalization | None


def identify_model(path: Path, settings: Settings) -> Identified:
    """The version ``path`` would serve under ``settings``, and what loading it needs; raises
    ``ModelLoadError`` for a directory that cannot be a reward model. It reads every file once
    (the digest) but loads no weights, so a refused directory costs no memory."""
    from transformers import AutoTokenizer

    checked = preflight(path, settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=settings.trust_remote_code
        )
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {exc}") from exc
    model_max = model_max_tokens(checked.config, tokenizer)
    max_tokens = settings.max_input_tokens or model_max
    if max_tokens > model_max:
        raise ModelLoadError(
            f"CRS_MAX_INPUT_TOKENS={max_tokens} exceeds the model's maximum of {model_max} tokens"
        )
    input_format = resolve_input_format(settings.input_format, tokenizer)
    normalization = reward_normalization(checked.config)
    serving = serving_settings(
        label_index=checked.label_index,
        input_format=input_format,
        max_input_tokens=max_tokens,
        normalization=normalization,
    )
    name = settings.model_name or path.resolve().name
    info = ModelInfo(
        name=name,
        version=f"{name}@{version_digest(model_digest(path), serving)}",
        path=path,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        input_format=input_format,
        max_input_tokens=max_tokens,
        label_index=checked.label_index,
        normalized=normalization is not None,
    )
    return Identified(info=info, checked=checked, tokenizer=tokenizer, normalization=normalization)


def load_reward_model(
    path: Path, settings: Settings, identified: Identified | None = None
) -> RewardModel:
    """Load weights and tokenizer from ``path`` and check they make a one-output reward model
    (from ``identified`` when the directory was identified already)."""
    from transformers import AutoModelForSequenceClassification

    found = identified or identify_model(path, settings)
    device = torch.device(found.info.device)
    model, loading_info = AutoModelForSequenceClassification.from_pretrained(
        path,
        dtype=getattr(torch, found.info.dtype),
        use_safetensors=found.checked.use_safetensors,
        trust_remote_code=settings.trust_remote_code,
        output_loading_info=True,
    )
    if loading_info.get("missing_keys"):
        missing = sorted(loading_info["missing_keys"])
        raise ModelLoadError(
            f"{path} is not a trained sequence classifier: weights missing for {missing[:4]} "
            "(a base model would get a random score head)"
        )
    pad_token_id = pad_id(found.tokenizer, model.config)
    # A decoder builds a key/value cache it is never asked for unless told not to: scoring
    # needs one only for prefix reuse, which asks for it.
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    loaded = RewardModel(
        info=found.info,
        model=model.to(device).eval(),
        formatter=Formatter(found.tokenizer, found.info.input_format, found.info.max_input_tokens),
        device=device,
        pad_token_id=pad_token_id,
        workers=plan_workers(settings.device_workers, device),
        normalization=found.normalization,
    )
    loaded = replace(loaded, unmasked_padding=decide_unmasked_padding(loaded))
    return replace(loaded, prefix_reuse=decide_prefix_reuse(loaded, settings.prefix_reuse))


def decide_unmasked_padding(model: RewardModel) -> bool:
    """On when the probe finds a right-padded batch scored alike with and without its
    attention mask, else off with the reason in the log. The scores are the same function
    either way, so the choice stays out of the version."""
    special = frozenset(int(t) for t in model.formatter.tokenizer.all_special_ids)
    reason = probe_unmasked_padding(model.model, model.pad_token_id, special)
    if reason is not None:
        log.info("padding mask for %s: kept, %s", model.info.version, reason)
        return False
    log.info("padding mask for %s: dropped (padding cannot reach real tokens)", model.info.version)
    return True


def probe_unmasked_padding(model: Any, pad_token_id: int, avoid: frozenset[int]) -> str | None:
    """Why ``model`` needs the attention mask of a right-padded batch (None when it does not):
    random sequences of different lengths must score the same without it, within the
    tolerance of the model's dtype. An encoder attends to the padding and fails; so does a
    model whose positions or pooling read the mask. Any failure is a reason, never an error."""
    # An encoder's attention reaches the padding, yet a random one may barely show it.
    if (reason := not_a_decoder(model)) is not None:
        return reason
    device = next(model.parameters()).device
    batch = probe_batch(model.get_input_embeddings().num_embeddings, avoid | {pad_token_id})
    try:
        with torch.inference_mode():
            masked = model(**pad_batch(batch, pad_token_id, device)).logits.float()
            unmasked = model(**pad_batch(batch, pad_token_id, device, mask_padding=False))
            unmasked = unmasked.logits.float()
    except Exception as exc:  # any failure means: keep the mask
        return f"the forward without a mask failed: {type(exc).__name__}: {exc}"
    dtype = next(model.parameters()).dtype
    tolerance = PROBE_TOLERANCE.get(dtype, 1e-3) * max(1.0, float(masked.abs().max()))
    error = float((unmasked - masked).abs().max())
    if not error <= tolerance:  # also catches NaN
        return f"scores without it differ by {error:.3g} (tolerance {tolerance:.3g})"
    return None


def decide_prefix_reuse(model: RewardModel, setting: str) -> bool:
    """``auto``: on when the probe finds grouped scores equal to full ones on this model (a
    decoder), else off with the reason in the log; ``off``: off. Either way the scores are the
    same function, so the choice stays out of the version."""
    if setting == "off":
        log.info("prefix reuse for %s: off (CRS_PREFIX_REUSE=off)", model.info.version)
        return False
    special = frozenset(int(t) for t in model.formatter.tokenizer.all_special_ids)
    reason = probe_prefix_reuse(
        model.model,
        model.plain_logits,
        model.pad_token_id,
        special,
        unmasked_padding=model.unmasked_padding,
    )
    if reason is not None:
        log.info("prefix reuse for %s: off, %s", model.info.version, reason)
        return False
    log.info("prefix reuse for %s: on (items sharing a prompt run it once)", model.info.version)
    return True


def pad_id(tokenizer: Any, config: Any) -> int:
    """The padding token. Decoder classifiers pool at the last token that is not
    ``config.pad_token_id``, so that id (when set) is what batches must be padded with."""
    candidates = (config.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    pad = next((int(c) for c in candidates if c is not None), None)
    if pad is None:
        raise ModelLoadError("the tokenizer has neither a pad nor an eos token to pad with")
    if config.pad_token_id is None:
        log.warning("model config has no pad_token_id; using %d so batches can be scored", pad)
        config.pad_token_id = pad
    return pad
