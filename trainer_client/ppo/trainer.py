"""The reference PPO loop: ``train(config)`` (``crs-trainer train``).

Per iteration: sample one response per prompt from the policy; send the batch to crs (the
fetch runs on the reward fetcher's loop thread) and, meanwhile, compute the rollout's old
logprobs, values and reference logprobs; put the chosen, scaled sequence reward on each
response's last token with a per-token KL penalty; GAE; whitened advantages; ``ppo_epochs``
passes of minibatches of the clipped policy loss plus ``vf_coef`` times the clipped value loss;
then the KL controller's update. Everything an iteration produced is appended to the JSONL
logs before the next one starts.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer_client.baselines.records import PromptLine, RecordError, read_prompt_file
from trainer_client.ppo.checkpoint import (
    CheckpointError,
    TrainerState,
    checkpoint_dir,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    torch_rng_state,
)
from trainer_client.ppo.config import TrainConfig
from trainer_client.ppo.logs import (
    METRICS,
    PLOT,
    SAMPLES,
    JsonlLog,
    keep_iterations_before,
    matplotlib_missing,
    plot_metrics,
    read_jsonl,
)
from trainer_client.ppo.rewards import (
    FetchedRewards,
    RewardFetcher,
    RewardScaler,
    ScaledRewards,
    select_rewards,
)
from trainer_client.progress import ProgressBar
from trainer_client.prompt_id import prompt_id

if TYPE_CHECKING:
    import torch

    from trainer_client import RewardResult
    from trainer_client.ppo.algo import KLController
    from trainer_client.ppo.policy import Models, Rollout

RolloutHook = Callable[[Sequence[PromptLine], Sequence[str]], Mapping[str, float]]
Metric = float | str | None

POLICY = "policy"
CONFIG = "config.json"


class TrainError(ValueError):
    """The run cannot start as asked (a missing file, an output directory in use, ...)."""


@dataclass(frozen=True, kw_only=True)
class TrainSummary:
    """What a run left: its output directory, the iterations done, the last metrics row and the
    final policy (a Hugging Face directory ``load_policy`` loads)."""

    out: Path
    iterations: int
    last: dict[str, Metric]
    policy_dir: Path

    def line(self) -> str:
        """The one-line summary the command prints."""
        reward, kl = self.last.get("reward_used"), self.last.get("kl")
        return (
            f"train: {self.iterations} iterations in {self.out}; last reward_used "
            f"{_short(reward)}, kl {_short(kl)}; policy in {self.policy_dir}"
        )


def _short(value: Metric) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class TrainingRun:
    """Everything that changes during a run: the models, the optimizer, the KL coefficient,
    the reward scaler, the iterations done and the data cursor."""

    config: TrainConfig
    models: Models
    optimizer: torch.optim.Optimizer
    kl_controller: KLController
    scaler: RewardScaler
    iteration: int = 0
    cursor: int = 0
    model_version: str | None = None

    def trainer_state(self) -> TrainerState:
        """The small parts of the run, for the checkpoint."""
        return TrainerState(
            iteration=self.iteration,
            cursor=self.cursor,
            kl_controller=self.kl_controller.state_dict(),
            reward_scaler=self.scaler.state_dict(),
            model_version=self.model_version,
        )


def train(config: TrainConfig, *, on_rollout: RolloutHook | None = None) -> TrainSummary:
    """Run PPO as ``config`` says; returns when ``config.iterations`` iterations are done.

    Args:
        config: the run's settings.
        on_rollout: called with each iteration's prompts and decoded responses; the floats it
            returns join that iteration's metrics row (the reproduction's gold reward, say).

    Raises:
        TrainError: a missing policy or prompt file, an output directory holding another run
            (without ``resume``), or a hook metric named like one of the trainer's.
        RecordError: an unusable line in the prompt file.
        PolicyError: the policy cannot be loaded on the device asked for.
        CheckpointError: ``resume`` without a readable checkpoint.
        RewardServiceError: crs cannot be reached or refused a request (its message names the
            URL); what the run finished so far is in the logs and the last checkpoint.
    """
    prompts = _read_prompts(config)
    _check_out(config)
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    with RewardFetcher(config) as fetcher:
        # Before the policy loads: a wrong URL or token costs seconds, not a model load.
        fetcher.check_reachable()
        run = prepare_run(config)
        _start_logs(config, run.iteration)
        last = _loop(run, fetcher, prompts, on_rollout)
    return _finish(run, last)


def _read_prompts(config: TrainConfig) -> list[PromptLine]:
    if not config.policy.is_dir():
        raise TrainError(f"policy {config.policy} is not a directory")
    if not config.prompts.is_file():
        raise TrainError(f"prompts {config.prompts} is not a file")
    prompts = read_prompt_file(config.prompts)
    if not prompts:
        raise RecordError(f"{config.prompts}: no prompts in the file")
    return prompts


def _check_out(config: TrainConfig) -> None:
    """A fresh run needs an output directory without another run in it; a resume needs one."""
    metrics = config.out / METRICS
    has_run = (metrics.exists() and metrics.stat().st_size > 0) or checkpoint_dir(
        config.out
    ).exists()
    if config.resume and not checkpoint_dir(config.out).is_dir():
        raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(config.out)}")
    if not config.resume and has_run:
        raise TrainError(
            f"{config.out} already holds a run; pass --resume to continue it, "
            "or choose another --out"
        )
    if config.plots and (why := matplotlib_missing()) is not None:
        raise TrainError(why)


def prepare_run(config: TrainConfig) -> TrainingRun:
    """Load the models and build the optimizer; with ``resume``, restore everything the
    checkpoint in ``config.out`` saved (weights, optimizer state, KL coefficient, reward
    statistics, RNG, iteration and data cursor).

    The learning rate is the configuration's, also on a resume: a run continued with a new
    ``--learning-rate`` gets it, with the rest of Adam's state unchanged.
    """
    import torch

    from trainer_client.ppo.policy import load_models

    checkpoint = load_checkpoint(checkpoint_dir(config.out)) if config.resume else None
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    models = load_models(
        config.policy,
        config.device,
        weights=None if checkpoint is None else checkpoint.policy_dir,
    )
    optimizer = torch.optim.AdamW(models.trainable_parameters(), lr=config.learning_rate)
    run = TrainingRun(
        config=config,
        models=models,
        optimizer=optimizer,
        kl_controller=_kl_controller(config),
        scaler=RewardScaler(config.reward_scale, config.lambda_max),
    )
    if checkpoint is not None:
        models.value_head.load_state_dict(checkpoint.value_head)
        optimizer.load_state_dict(checkpoint.optimizer)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate
        run.kl_controller.load_state_dict(checkpoint.state.kl_controller)
        run.scaler.load_state_dict(checkpoint.state.reward_scaler)
        run.iteration = checkpoint.state.iteration
        run.cursor = checkpoint.state.cursor
        run.model_version = checkpoint.state.model_version
        restore_rng(checkpoint.rng)
    return run


def _kl_controller(config: TrainConfig) -> KLController:
    from trainer_client.ppo.algo import AdaptiveKLController, FixedKLController

    if config.kl_target is None:
        return FixedKLController(config.kl_coef)
    return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)


def _start_logs(config: TrainConfig, iteration: int) -> None:
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / CONFIG).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    # Rows of iterations after the checkpoint ran, but their updates were lost: run them again.
    for name in (METRICS, SAMPLES):
        keep_iterations_before(config.out / name, iteration)


def _loop(
    run: TrainingRun,
    fetcher: RewardFetcher,
    prompts: Sequence[PromptLine],
    on_rollout: RolloutHook | None,
) -> dict[str, Metric]:
    from trainer_client.client.reward_client import RewardServiceError

    config = run.config
    # A resume with nothing left to run reports the last row the run logged.
    logged = read_jsonl(config.out / METRICS)
    last: dict[str, Metric] = logged[-1] if logged else {}
    with (
        JsonlLog(config.out / METRICS) as metrics,
        JsonlLog(config.out / SAMPLES) as samples,
        ProgressBar(
            config.iterations, description="ppo", quiet=config.quiet, unit="iteration"
        ) as bar,
    ):
        bar.update(run.iteration)
        saved_at = run.iteration
        while run.iteration < config.iterations:
            batch = batch_prompts(prompts, run.cursor, config.batch_size, config.seed)
            rng_before = torch_rng_state()
            try:
                last, sample_rows = run_iteration(run, fetcher, batch, on_rollout)
            except RewardServiceError:
                # crs failed before this iteration's update: the state of the iterations done
                # is whole (the RNG put back to before this rollout), so keep it for --resume.
                if run.iteration > saved_at:
                    restore_rng(rng_before)
                    _save(run)
                raise
            run.iteration += 1
            run.cursor += len(batch)
            metrics.write([last])
            samples.write(sample_rows)
            bar.update(1)
            _show(bar, last)
            every = config.save_every
            if every and run.iteration % every == 0 and run.iteration < config.iterations:
                _save(run)
                saved_at = run.iteration
    return last


def _show(bar: ProgressBar, row: Mapping[str, Metric]) -> None:
    bar.set_postfix({"reward": _short(row.get("reward_used")), "kl": _short(row.get("kl"))})


def _save(run: TrainingRun) -> None:
    save_checkpoint(run.config.out, run.models, run.optimizer, run.trainer_state())
    if run.config.plots:
        plot_metrics(run.config.out / METRICS, run.config.out / PLOT)


def _finish(run: TrainingRun, last: dict[str, Metric]) -> TrainSummary:
    from trainer_client.ppo.policy import save_policy

    _save(run)
    policy_dir = run.config.out / POLICY
    save_policy(run.models, policy_dir)
    return TrainSummary(
        out=run.config.out, iterations=run.iteration, last=last, policy_dir=policy_dir
    )


def batch_prompts(
    prompts: Sequence[PromptLine], cursor: int, size: int, seed: int
) -> list[PromptLine]:
    """The ``size`` prompts after the first ``cursor`` of the run's prompt stream.

    The stream is the prompt file in a new seeded order each epoch (pass over the file), so
    the position ``cursor`` alone says where a resumed run continues.
    """
    orders: dict[int, list[int]] = {}
    batch = []
    for position in range(cursor, cursor + size):
        epoch, offset = divmod(position, len(prompts))
        if epoch not in orders:
            order = list(range(len(prompts)))
            random.Random(f"{seed}:{epoch}").shuffle(order)
            orders[epoch] = order
        batch.append(prompts[orders[epoch][offset]])
    return batch


def sent_prompt_id(line: PromptLine) -> str | None:
    """The prompt id to send crs: the one the prompt file gave, None where it was derived (crs
    derives the same one)."""
    return None if line.prompt_id == prompt_id(line.prompt) else line.prompt_id


@dataclass(frozen=True, kw_only=True)
class OldScores:
    """The rollout under the policy that sampled it and under the reference (no gradient)."""

    logprobs: torch.Tensor
    values: torch.Tensor
    ref_logprobs: torch.Tensor


def run_iteration(
    run: TrainingRun,
    fetcher: RewardFetcher,
    batch: Sequence[PromptLine],
    on_rollout: RolloutHook | None,
) -> tuple[dict[str, Metric], list[dict[str, Any]]]:
    """One PPO iteration on ``batch``: the metrics row and the sample rows it logs."""
    from trainer_client.ppo.policy import generate_rollout

    config = run.config
    started = time.monotonic()
    rollout = generate_rollout(
        run.models.policy,
        [line.prompt for line in batch],
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
    )
    rollout_s = time.monotonic() - started
    sent = [sent_prompt_id(line) for line in batch]
    items = [
        {"prompt": line.prompt, "response": response, **({"prompt_id": pid} if pid else {})}
        for line, response, pid in zip(batch, rollout.responses, sent, strict=True)
    ]
    fetched, old, timing = _rewards_and_old_scores(run, fetcher, items, rollout)
    extras = dict(on_rollout(batch, rollout.responses)) if on_rollout is not None else {}
    results = fetched.results
    scaled = run.scaler.scale(results, select_rewards(results, config))
    kl_coef = run.kl_controller.value
    started = time.monotonic()
    losses = ppo_update(run, rollout, old, scaled, kl_coef) if scaled.kept else {}
    update_s = time.monotonic() - started
    kl, kl_k1 = sequence_kl(old, rollout.response_mask)
    run.kl_controller.update(kl, len(batch))
    if results:
        run.model_version = results[0].model_version
    row = _metrics_row(run, results, scaled, rollout, losses)
    row.update(
        kl=kl,
        kl_k1=kl_k1,
        kl_coef=kl_coef,
        reward_fetch_s=fetched.fetch_s,
        rollout_s=rollout_s,
        update_s=update_s,
        **timing,
    )
    _add_extras(row, extras)
    samples = _sample_rows(run, batch, sent, rollout.responses, results, scaled)
    return row, samples


def _rewards_and_old_scores(
    run: TrainingRun,
    fetcher: RewardFetcher,
    items: Sequence[Mapping[str, Any]],
    rollout: Rollout,
) -> tuple[FetchedRewards, OldScores, dict[str, float]]:
    """crs's answers and the rollout's old scores; with ``overlap``, the scores are computed
    while the answers are on their way."""
    pending = fetcher.start(items)
    try:
        if run.config.overlap:
            started = time.monotonic()
            old = old_scores(run.models, rollout, run.config.temperature)
            score_s = time.monotonic() - started
            waited = time.monotonic()
            fetched = pending.wait()
            wait_s = time.monotonic() - waited
        else:
            waited = time.monotonic()
            fetched = pending.wait()
            wait_s = time.monotonic() - waited
            started = time.monotonic()
            old = old_scores(run.models, rollout, run.config.temperature)
            score_s = time.monotonic() - started
    except BaseException:
        pending.cancel()
        raise
    return fetched, old, {"score_s": score_s, "reward_wait_s": wait_s}


def old_scores(models: Models, rollout: Rollout, temperature: float) -> OldScores:
    """The rollout's logprobs and values under the current policy, and its reference logprobs."""
    import torch

    from trainer_client.ppo.policy import score_rollout

    with torch.no_grad():
        policy = score_rollout(
            models.policy.model, rollout, temperature=temperature, value_head=models.value_head
        )
        reference = score_rollout(models.reference, rollout, temperature=temperature)
    assert policy.values is not None  # asked for with the value head
    return OldScores(
        logprobs=policy.logprobs, values=policy.values, ref_logprobs=reference.logprobs
    )


def sequence_kl(old: OldScores, mask: torch.Tensor) -> tuple[float, float]:
    """KL(policy || reference) per sequence (summed over its tokens), batch mean: the k3
    estimate (never negative) and the k1 one (unbiased per token, but noisy and signed)."""
    from trainer_client.ppo.algo import kl_per_token

    k3 = (kl_per_token(old.logprobs, old.ref_logprobs, "k3") * mask).sum(dim=1)
    k1 = (kl_per_token(old.logprobs, old.ref_logprobs, "k1") * mask).sum(dim=1)
    return float(k3.mean().item()), float(k1.mean().item())


def ppo_update(
    run: TrainingRun, rollout: Rollout, old: OldScores, scaled: ScaledRewards, kl_coef: float
) -> dict[str, float]:
    """PPO's epochs of minibatch updates on the kept samples; the losses' means."""
    import torch

    from trainer_client.ppo.algo import gae, kl_per_token, masked_whiten, token_rewards

    config, device = run.config, run.models.device
    kept = torch.tensor(scaled.kept, device=device)
    batch = rollout.rows(kept)
    mask = batch.response_mask
    old_logprobs, old_values = old.logprobs[kept], old.values[kept]
    kl = kl_per_token(old_logprobs, old.ref_logprobs[kept], config.kl_estimator)
    used = [scaled.used[index] for index in scaled.kept]
    scores = torch.tensor(used, dtype=old_values.dtype, device=device)
    rewards = token_rewards(scores, kl, mask, kl_coef)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    totals: dict[str, list[float]] = {}
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(scaled.kept)).to(device)
        for start in range(0, len(scaled.kept), config.minibatch_size):
            rows = order[start : start + config.minibatch_size]
            step = _minibatch_step(
                run,
                batch.rows(rows),
                old_logprobs[rows],
                old_values[rows],
                advantages[rows],
                returns[rows],
            )
            for name, value in step.items():
                totals.setdefault(name, []).append(value)
    return {name: statistics.fmean(values) for name, values in totals.items()}


def _minibatch_step(
    run: TrainingRun,
    batch: Rollout,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
) -> dict[str, float]:
    """One gradient step: clipped policy loss + vf_coef x clipped value loss - ent_coef x
    entropy, gradients clipped to ``max_grad_norm``."""
    import torch

    from trainer_client.ppo.algo import masked_mean, policy_loss, value_loss
    from trainer_client.ppo.policy import score_rollout

    config, models = run.config, run.models
    mask = batch.response_mask
    scores = score_rollout(
        models.policy.model,
        batch,
        temperature=config.temperature,
        value_head=models.value_head,
        entropy=True,
    )
    assert scores.values is not None  # asked for with the value head
    assert scores.entropy is not None
    policy = policy_loss(scores.logprobs, old_logprobs, advantages, mask, config.clip_range)
    value = value_loss(scores.values, old_values, returns, mask, config.clip_range_value)
    entropy = masked_mean(scores.entropy, mask)
    loss = policy.loss + config.vf_coef * value.loss
    if config.ent_coef > 0:
        loss = loss - config.ent_coef * entropy
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(models.trainable_parameters(), config.max_grad_norm)
    run.optimizer.step()
    return {
        "policy_loss": float(policy.loss.item()),
        "value_loss": float(value.loss.item()),
        "entropy": float(entropy.item()),
        "clip_fraction": float(policy.clip_fraction.item()),
        "value_clip_fraction": float(value.clip_fraction.item()),
        "approx_kl": float(policy.approx_kl.item()),
    }


_LOSSES = (
    "policy_loss",
    "value_loss",
    "entropy",
    "clip_fraction",
    "value_clip_fraction",
    "approx_kl",
)


def _metrics_row(
    run: TrainingRun,
    results: Sequence[RewardResult],
    scaled: ScaledRewards,
    rollout: Rollout,
    losses: Mapping[str, float],
) -> dict[str, Metric]:
    used = [value for value in scaled.used if value is not None]
    baselines = [r.baseline for r in results if r.baseline is not None]
    contrastive = [r.contrastive for r in results if r.contrastive is not None]
    return {
        "iteration": run.iteration,
        "reward_raw": _mean([r.reward for r in results]),
        "baseline": _mean(baselines),
        "contrastive": _mean(contrastive),
        "reward_used": _mean(used),
        "reward_used_std": statistics.pstdev(used) if used else None,
        "scale": scaled.scale,
        # With every sample dropped there was no update: no losses, rather than zeros.
        **{name: losses.get(name) for name in _LOSSES},
        "response_length": _mean([float(n) for n in rollout.lengths]),
        "model_version": run.model_version,
        "skipped": scaled.skipped,
        "kept": len(scaled.kept),
    }


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _add_extras(row: dict[str, Metric], extras: Mapping[str, float]) -> None:
    for name, value in extras.items():
        if name in row:
            raise TrainError(f"the rollout hook's metric {name!r} is one of the trainer's own")
        row[name] = float(value)


def _sample_rows(
    run: TrainingRun,
    batch: Sequence[PromptLine],
    sent: Sequence[str | None],
    responses: Sequence[str],
    results: Sequence[RewardResult],
    scaled: ScaledRewards,
) -> list[dict[str, Any]]:
    return [
        {
            "iteration": run.iteration,
            "prompt_id": pid,
            "prompt": line.prompt,
            "response": response,
            "reward": result.reward,
            "baseline": result.baseline,
            "contrastive": result.contrastive,
            "baseline_source": result.baseline_source,
            "used": used,
            "scale": scaled.scale,
            "model_version": result.model_version,
            "skipped": used is None,
        }
        for line, pid, response, result, used in zip(
            batch, sent, responses, results, scaled.used, strict=True
        )
    ]
