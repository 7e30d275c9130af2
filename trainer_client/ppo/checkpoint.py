"""The trainer's checkpoint: ``out/checkpoint/``, the latest state a run can resume from.

What it holds: ``policy/`` (save_pretrained and the tokenizer), ``value_head.pt``,
``optimizer.pt``, ``rng.pt`` (torch's CPU and CUDA generators) and ``state.json`` (the
iterations done, the data cursor, the KL controller, the reward scaler's running moments, the
Python RNG). It is written into ``checkpoint.partial/`` and renamed into place, so a crash while
saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from trainer_client.ppo.policy import Models

CHECKPOINT = "checkpoint"
_PARTIAL = "checkpoint.partial"
_RETIRED = "checkpoint.old"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; the message names the path."""


@dataclass(frozen=True, kw_only=True)
class TrainerState:
    """The run's progress and its small stateful parts, as ``state.json`` holds them.

    ``iteration`` counts the iterations done (the next one to run has this number);
    ``cursor`` the prompts consumed so far (see ``trainer.batch_prompts``).
    """

    iteration: int
    cursor: int
    kl_controller: dict[str, float]
    reward_scaler: dict[str, dict[str, float]]
    model_version: str | None = None


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A checkpoint as read back: the state, and the tensors' state dicts (on CPU)."""

    path: Path
    state: TrainerState
    value_head: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]

    @property
    def policy_dir(self) -> Path:
        """The saved policy (a Hugging Face directory)."""
        return self.path / "policy"


def checkpoint_dir(out: Path) -> Path:
    """Where the run in ``out`` keeps its checkpoint."""
    return out / CHECKPOINT


def save_checkpoint(
    out: Path, models: Models, optimizer: torch.optim.Optimizer, state: TrainerState
) -> Path:
    """Write the whole checkpoint next to the current one, then swap it in."""
    import torch

    from trainer_client.ppo.policy import save_policy

    partial = out / _PARTIAL
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_policy(models, partial / "policy")
    torch.save(models.value_head.state_dict(), partial / "value_head.pt")
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(torch_rng_state(), partial / "rng.pt")
    body = {
        "format": FORMAT,
        "iteration": state.iteration,
        "cursor": state.cursor,
        "kl_controller": state.kl_controller,
        "reward_scaler": state.reward_scaler,
        "model_version": state.model_version,
        "python_rng": _python_rng_state(),
    }
    (partial / "state.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    final, retired = checkpoint_dir(out), out / _RETIRED
    shutil.rmtree(retired, ignore_errors=True)
    if final.exists():
        final.rename(retired)
    partial.rename(final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory (``out/checkpoint``); tensors land on the CPU.

    Raises:
        CheckpointError: the directory or one of its files is missing or unreadable.
    """
    import torch

    if not (path / "state.json").is_file():
        raise CheckpointError(f"no checkpoint in {path} (state.json is missing)")
    try:
        body = json.loads((path / "state.json").read_text(encoding="utf-8"))
        state = TrainerState(
            iteration=int(body["iteration"]),
            cursor=int(body["cursor"]),
            kl_controller=dict(body["kl_controller"]),
            reward_scaler=dict(body["reward_scaler"]),
            model_version=body.get("model_version"),
        )
        tensors = {
            name: torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
            for name in ("value_head", "optimizer", "rng")
        }
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"cannot read the checkpoint in {path}: {error}") from error
    rng = {**tensors["rng"], "python": body.get("python_rng")}
    return Checkpoint(
        path=path,
        state=state,
        value_head=tensors["value_head"],
        optimizer=tensors["optimizer"],
        rng=rng,
    )


def torch_rng_state() -> dict[str, Any]:
    """torch's CPU generator and, where CUDA is up, every GPU's."""
    import torch

    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Put back the generators ``load_checkpoint`` read (those this machine has)."""
    import torch

    torch.set_rng_state(rng["cpu"])
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    python = rng.get("python")
    if python is not None:
        version, internal, gauss = python
        random.setstate((version, tuple(internal), gauss))


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
