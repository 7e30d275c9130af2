"""The paper's comparison on the gold-reward task: PPO on raw proxy rewards against PPO on
contrastive ones, over label-noise levels, baseline sizes k and seeds (`crs-trainer reproduce`).

One crs server serves the three proxy reward models under the names ``noise0``, ``noise20``,
``noise40``. The SFT policy's k baseline responses per training prompt are sampled once (the
largest k) and pushed under prompt ids ``k{k}/<prompt id>`` holding the first k of them, so
one store holds every k at once and a run picks its k by the prompt ids it sends. Every run
starts from the same SFT policy, with the same seed per seed index for raw and contrastive
arms, and the same budget. Judged by the gold reward: its mean on held-out prompts and the
win rate against SFT samples of the same prompts (ties count a half).

torch and transformers are imported inside functions (through the trainer and the task's
models): importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer_client.baselines.records import PromptLine, read_prompt_file
from trainer_client.launch import RedisProcess, ServiceProcess
from trainer_client.repro.task import GoldTask

RAW = "raw"
# Bumped when what a run trains on changes in a way its settings do not show.
RUN_FORMAT = 2


@dataclass(frozen=True, kw_only=True)
class GridConfig:
    """The comparison's cells and budget. The defaults take about 15 minutes on 2 CPU cores."""

    workdir: Path
    noise_levels: tuple[float, ...] = (0.0, 0.2, 0.4)
    ks: tuple[int, ...] = (1, 3, 8)
    seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 40
    batch_size: int = 32
    max_new_tokens: int = 16
    learning_rate: float = 1e-4
    kl_coef: float = 0.05
    eval_samples: int = 4
    use_redis: bool | None = None
    quiet: bool = False
    train_options: Mapping[str, Any] = field(default_factory=dict)
    # build_assets' sizes (train_prompts, sft_steps, rm_steps, rm_pairs): smaller ones for tests.
    asset_options: Mapping[str, Any] = field(default_factory=dict)
    # Where the task's models are built (None: workdir/assets); the demo shares the
    # reproduction's, so whichever runs first builds them for the other.
    assets_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.noise_levels or not self.ks or not self.seeds:
            raise ValueError("noise_levels, ks and seeds must each name at least one value")
        if any(not 0 <= n < 0.5 for n in self.noise_levels):
            raise ValueError(f"noise levels must be in [0, 0.5), got {self.noise_levels}")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"every k must be >= 1, got {self.ks}")
        if self.iterations < 1 or self.batch_size < 1 or self.eval_samples < 1:
            raise ValueError("iterations, batch_size and eval_samples must be >= 1")

    def arms(self) -> list[str]:
        """``raw`` and one contrastive arm per k: ``contrastive-k3``."""
        return [RAW, *(f"contrastive-k{k}" for k in self.ks)]


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """One PPO run, judged: the final policy on held-out prompts, and its training curves."""

    noise: float
    arm: str
    seed: int
    gold: float
    win_rate: float
    proxy: float
    kl: float
    reward_std: float
    gold_curve: list[float]
    proxy_curve: list[float]
    seconds: float
    rm_agreement: float  # the proxy RM's agreement with gold on clean held-out pairs

    @property
    def over_optimisation(self) -> float:
        """How far the gold reward fell from its best (3-iteration average) to its end, while
        the proxy reward rose over the same span; 0 when it did not fall or the proxy did not
        rise (the policy was not fooled, it was just noisy)."""
        gold, proxy = smooth(self.gold_curve), smooth(self.proxy_curve)
        if not gold:
            return 0.0
        peak = max(range(len(gold)), key=gold.__getitem__)
        drop = gold[peak] - gold[-1]
        return drop if drop > 0 and proxy[-1] > proxy[peak] else 0.0


def smooth(curve: Sequence[float], width: int = 3) -> list[float]:
    """A trailing moving average (the first points average what there is)."""
    return [statistics.fmean(curve[max(0, i - width + 1) : i + 1]) for i in range(len(curve))]


def noise_name(noise: float) -> str:
    """The crs model name of the proxy RM trained with this label noise: ``noise20``."""
    return f"noise{round(noise * 100)}"


def win_rate(policy_gold: Sequence[float], reference_gold: Sequence[float]) -> float:
    """The share of paired samples where the policy's gold reward beats the reference's."""
    if len(policy_gold) != len(reference_gold) or not policy_gold:
        raise ValueError("win_rate needs two non-empty lists of the same length")
    wins = sum(
        1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(policy_gold, reference_gold, strict=True)
    )
    return wins / len(policy_gold)


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """What every run of a grid shares: the task, its models, the server and the prompts."""

    config: GridConfig
    task: GoldTask
    assets: Any  # trainer_client.repro.models.TaskAssets (imported lazily: it needs torch)
    url: str
    train_prompts: Path
    prompt_files: Mapping[int, Path]
    eval_prompts: list[PromptLine]
    store: str
    # The SFT policy's held-out samples per seed: the same for every arm and noise level.
    sft_samples: dict[int, list[tuple[str, str]]] = field(default_factory=dict)

    def reference_samples(self, seed: int) -> list[tuple[str, str]]:
        """The SFT samples a run of this seed is judged against (sampled once per seed)."""
        if seed not in self.sft_samples:
            self.sft_samples[seed] = eval_samples(self.assets.sft, self, seed)
        return self.sft_samples[seed]


def run_grid(config: GridConfig) -> list[RunResult]:
    """Every (noise level, arm, seed) cell, one PPO run each; finished runs are reused."""
    from trainer_client.progress import ProgressBar

    cells = [
        (n, arm, s) for n in config.noise_levels for s in config.seeds for arm in config.arms()
    ]
    with (
        experiment(config) as exp,
        ProgressBar(len(cells), description="PPO runs", quiet=config.quiet) as bar,
    ):
        results = []
        for noise, arm, seed in cells:
            results.append(run_cell(exp, noise, arm, seed))
            bar.update(1)
    return results


@contextmanager
def experiment(config: GridConfig) -> Iterator[Experiment]:
    """Build (or reuse) the task's models, sample and push the baselines, serve the proxy RMs;
    stop everything started on the way out."""
    from transformers.utils import logging as transformers_logging

    from trainer_client.repro.models import build_assets

    # Dozens of models load and save here: their per-file progress bars would bury ours.
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    assets = build_assets(
        config.assets_dir or config.workdir / "assets",
        noise_levels=config.noise_levels,
        quiet=config.quiet,
        **config.asset_options,
    )
    baselines = sample_sft_baselines(assets.sft, assets.train_prompts, config)
    k_files = write_k_files(
        baselines, assets.train_prompts, config.ks, config.workdir / "baselines"
    )
    models = {noise_name(n): assets.rms[n].path for n in config.noise_levels}
    with baseline_store(config) as (store, redis_url):
        args = ["--redis-url", redis_url] if redis_url else []
        with ServiceProcess(models, args=args) as server:
            server.wait_ready()
            for baseline_file, _ in k_files.values():
                push_file(baseline_file, server.url, quiet=config.quiet)
            yield Experiment(
                config=config,
                task=assets.task,
                assets=assets,
                url=server.url,
                train_prompts=assets.train_prompts,
                prompt_files={k: prompts for k, (_, prompts) in k_files.items()},
                eval_prompts=read_prompt_file(assets.eval_prompts),
                store=store,
            )


@contextmanager
def baseline_store(config: GridConfig) -> Iterator[tuple[str, str | None]]:
    """A redis-server of our own when one is installed (or asked for), else the service's
    in-process store: ``(what it is, its URL or None)``."""
    use_redis = config.use_redis
    if use_redis is None:
        use_redis = shutil.which("redis-server") is not None
    if not use_redis:
        yield "in-process", None
        return
    with RedisProcess(config.workdir / "redis") as redis:
        yield "redis", redis.url


def sample_sft_baselines(sft: Path, prompts: Path, config: GridConfig) -> Path:
    """max(k) SFT responses per training prompt (resumable: sample-baselines skips done ones)."""
    from trainer_client.baselines.sampling import SamplingConfig, sample_baselines

    # Named by the policy's weights: samples of an SFT policy since rebuilt are not reused.
    name = f"sft-{weights_digest(sft)}-k{max(config.ks)}-t{config.max_new_tokens}.jsonl"
    out = config.workdir / "baselines" / name
    sampling = SamplingConfig(
        k=max(config.ks), max_new_tokens=config.max_new_tokens, batch_size=32, device="cpu"
    )
    sample_baselines(sft, prompts, out, sampling, quiet=config.quiet)
    return out


def weights_digest(model_dir: Path) -> str:
    """A short digest of a model directory's weights files."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_key(exp: Experiment, noise: float, arm: str, seed: int) -> str:
    """What a finished run's result depends on: reused only when all of it is the same."""
    config = exp.config
    settings = {
        "sft": weights_digest(exp.assets.sft),
        "rm": weights_digest(exp.assets.rms[noise].path),
        "arm": arm,
        "seed": seed,
        "prompts": RUN_FORMAT,
        "iterations": config.iterations,
        "batch_size": config.batch_size,
        "max_new_tokens": config.max_new_tokens,
        "learning_rate": config.learning_rate,
        "kl_coef": config.kl_coef,
        "eval_samples": config.eval_samples,
        "train_options": dict(config.train_options),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_k_files(
    samples: Path, train_prompts: Path, ks: Sequence[int], folder: Path
) -> dict[int, tuple[Path, Path]]:
    """Per k: a baseline file of the first k SFT responses of each prompt under
    ``k{k}/<prompt id>``, and the training prompt file again, line for line, with those ids: a
    contrastive run meets the same prompts in the same order as the raw run of its seed."""
    rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line]
    lines = read_prompt_file(train_prompts)
    files = {}
    for k in ks:
        baselines, prompts = folder / f"baselines-k{k}.jsonl", folder / f"prompts-k{k}.jsonl"
        with baselines.open("w", encoding="utf-8") as sink:
            for row in rows:
                key = f"k{k}/{row['prompt_id']}"
                record = {
                    "prompt_id": key,
                    "prompt": row["prompt"],
                    "responses": row["responses"][:k],
                }
                sink.write(json.dumps(record) + "\n")
        with prompts.open("w", encoding="utf-8") as sink:
            for line in lines:
                record = {"prompt_id": f"k{k}/{line.prompt_id}", "prompt": line.prompt}
                sink.write(json.dumps(record) + "\n")
        files[k] = (baselines, prompts)
    return files


def push_file(path: Path, url: str, *, quiet: bool) -> None:
    """`crs-trainer push-baselines FILE --url URL`, failing loudly if a prompt is not stored."""
    from trainer_client.baselines.push import PushOptions, push_baselines

    summary = push_baselines(path, PushOptions(urls=[url]), quiet=quiet)
    if summary.failed:
        raise RuntimeError(f"{summary.failed} prompts of {path} were not stored")


def run_cell(exp: Experiment, noise: float, arm: str, seed: int) -> RunResult:
    """One PPO run from the SFT policy, judged on the held-out prompts; reused when done."""
    out = exp.config.workdir / "runs" / noise_name(noise) / arm / f"seed{seed}"
    done, key = out / "result.json", run_key(exp, noise, arm, seed)
    if done.exists():
        saved = json.loads(done.read_text(encoding="utf-8"))
        if saved.pop("key", None) == key:
            return RunResult(**saved)
    if out.exists():
        shutil.rmtree(out)  # a run cut short starts again from the SFT policy
    started = time.monotonic()
    summary = train_arm(exp, noise, arm, seed, out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = eval_samples(summary.policy_dir, exp, seed)
    reference = exp.reference_samples(seed)
    gold = [exp.task.gold_reward(prompt, response) for prompt, response in samples]
    reference_gold = [exp.task.gold_reward(prompt, response) for prompt, response in reference]
    result = RunResult(
        noise=noise,
        arm=arm,
        seed=seed,
        gold=statistics.fmean(gold),
        win_rate=win_rate(gold, reference_gold),
        proxy=proxy_reward(exp.url, noise_name(noise), samples),
        kl=statistics.fmean(row["kl"] for row in metrics[-3:]),
        reward_std=statistics.fmean(row["reward_used_std"] for row in metrics),
        gold_curve=[row["gold"] for row in metrics],
        proxy_curve=[row["reward_raw"] for row in metrics],
        seconds=time.monotonic() - started,
        rm_agreement=exp.assets.rms[noise].heldout_agreement,
    )
    done.write_text(json.dumps(asdict(result) | {"key": key}), encoding="utf-8")
    return result


def train_arm(exp: Experiment, noise: float, arm: str, seed: int, out: Path) -> Any:
    """`crs-trainer train` for one arm: raw proxy rewards, or contrastive against k baselines."""
    from trainer_client.ppo.config import TrainConfig
    from trainer_client.ppo.trainer import train

    config = exp.config
    prompts = exp.train_prompts if arm == RAW else exp.prompt_files[int(arm.rsplit("k", 1)[1])]
    options: dict[str, Any] = {
        "iterations": config.iterations,
        "batch_size": config.batch_size,
        "max_new_tokens": config.max_new_tokens,
        "learning_rate": config.learning_rate,
        "kl_coef": config.kl_coef,
        **config.train_options,
    }
    train_config = TrainConfig(
        policy=exp.assets.sft,
        prompts=prompts,
        out=out,
        urls=(exp.url,),
        model=noise_name(noise),
        reward="raw" if arm == RAW else "contrastive",
        seed=seed,
        device="cpu",
        plots=False,
        quiet=True,
        **options,
    )
    task = exp.task

    def gold_of_rollout(lines: Sequence[PromptLine], responses: Sequence[str]) -> dict[str, float]:
        golds = [
            task.gold_reward(str(line.prompt), r) for line, r in zip(lines, responses, strict=True)
        ]
        return {"gold": statistics.fmean(golds)}

    return train(train_config, on_rollout=gold_of_rollout)


def eval_samples(policy_dir: Path, exp: Experiment, seed: int) -> list[tuple[str, str]]:
    """``eval_samples`` responses per held-out prompt, (prompt, response) pairs in a fixed order,
    drawn with a seed of the run's seed index: a policy and the SFT policy are compared on the
    same prompts with the same random stream."""
    from trainer_client.baselines.sampling import SamplingConfig, load_policy, sample_batch

    policy = load_policy(policy_dir, "cpu")
    sampling = SamplingConfig(
        k=exp.config.eval_samples, max_new_tokens=exp.config.max_new_tokens, device="cpu"
    )
    prompts = [str(line.prompt) for line in exp.eval_prompts]
    rng = random.Random(10_000 + seed)
    pairs: list[tuple[str, str]] = []
    for start in range(0, len(prompts), 64):
        batch = prompts[start : start + 64]
        responses = sample_batch(policy, batch, sampling, rng.randrange(2**31))
        pairs += [(p, r) for p, rs in zip(batch, responses, strict=True) for r in rs]
    return pairs


def proxy_reward(url: str, model: str, pairs: Sequence[tuple[str, str]]) -> float:
    """The mean proxy RM score crs gives these pairs (raw rewards, no baselines)."""
    from trainer_client import RewardClient

    with RewardClient(url, model=model) as client:
        results = client.score([{"prompt": p, "response": r} for p, r in pairs], contrastive=None)
    return statistics.fmean(result.reward for result in results)
