"""The reproduction's models, built small: the word-level tokenizer, an SFT policy that samples
through the trainer's own loading path, and proxy RMs that crs serves as trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.scoring.model import load_reward_model
from service.scoring.types import RewardInput
from service.settings import Settings
from tests.models import worker_share_of_torch_threads
from trainer_client.baselines.records import read_prompt_file
from trainer_client.baselines.sampling import SamplingConfig, load_policy, sample_batch
from trainer_client.repro.models import TaskAssets, build_assets, score_pairs
from trainer_client.repro.task import default_task

TASK = default_task()
# Small enough for seconds on two cores, big enough that the clean RM learns gold's order.
SIZES = {"train_prompts": 24, "sft_steps": 60, "rm_steps": 80, "rm_pairs": 4000}
# Chance is 0.5; these sizes give about 0.74 (the full build: about 0.83).
CLEAN_AGREEMENT = 0.7


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TaskAssets:
    workdir = tmp_path_factory.mktemp("repro") / "assets"
    with worker_share_of_torch_threads():
        return build_assets(workdir, noise_levels=(0.0, 0.4), quiet=True, **SIZES)


def test_tokenizer_encodes_prompt_and_pair_as_the_policy_and_crs_expect(
    assets: TaskAssets,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer)
    vocab = tokenizer.get_vocab()
    prompt, response = "describe the sea briefly", "waves salt the boat"
    single = tokenizer(prompt)["input_ids"]
    pair = tokenizer(prompt, response)["input_ids"]
    prompt_ids = [vocab[w] for w in prompt.split()]
    response_ids = [vocab[w] for w in response.split()]
    bos, sep, eos = (vocab[t] for t in ("[BOS]", "[SEP]", "[EOS]"))
    assert single == [bos, *prompt_ids, sep]
    assert pair == [bos, *prompt_ids, sep, *response_ids, eos]
    assert "token_type_ids" not in tokenizer(prompt, response)
    assert tokenizer.chat_template is None
    assert tokenizer.decode(pair, skip_special_tokens=True) == f"{prompt} {response}"
    assert tokenizer.decode(response_ids) == response
    assert tokenizer("waves Waves, zzz")["input_ids"][1:-1] == [
        vocab["waves"],
        *[vocab["[UNK]"]] * 2,
    ]
    assert len(tokenizer) == 5 + len(TASK.words())


def test_sft_policy_loads_and_samples_vocabulary_words(assets: TaskAssets) -> None:
    policy = load_policy(assets.sft, "cpu")
    assert policy.tokenizer.pad_token == "[PAD]"
    assert policy.model.generation_config.eos_token_id == policy.tokenizer.eos_token_id
    prompts = TASK.all_prompts()[::12]
    config = SamplingConfig(k=4, max_new_tokens=20)
    samples = sample_batch(policy, prompts, config, seed=0)
    assert sample_batch(policy, prompts, config, seed=0) == samples
    responses = [r for rows in samples for r in rows]
    allowed = set(TASK.words())
    assert all(set(r.split()) <= allowed for r in responses)
    assert all(r == " ".join(r.split()) for r in responses)
    # It learned to stop: most responses end at [EOS], well before the token limit.
    stopped = [len(r.split()) < config.max_new_tokens for r in responses]
    assert sum(stopped) >= 0.75 * len(responses)


def test_clean_rm_agrees_with_gold_and_noisy_one_less(assets: TaskAssets) -> None:
    clean, noisy = assets.rms[0.0], assets.rms[0.4]
    assert clean.heldout_agreement > CLEAN_AGREEMENT
    assert noisy.heldout_agreement < clean.heldout_agreement - 0.05
    # The saved model, on pairs of another seed, agrees as the build measured.
    tokenizer = AutoTokenizer.from_pretrained(clean.path)
    model = AutoModelForSequenceClassification.from_pretrained(clean.path).eval()
    pairs = TASK.preference_pairs(1000, seed=12345)
    chosen = score_pairs(model, tokenizer, [(p.prompt, p.chosen) for p in pairs])
    rejected = score_pairs(model, tokenizer, [(p.prompt, p.rejected) for p in pairs])
    agreement = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    assert agreement > CLEAN_AGREEMENT


@pytest.mark.parametrize("flip", [0.0, 0.4])
def test_crs_serves_the_rm_as_a_direct_forward_scores(assets: TaskAssets, flip: float) -> None:
    path = assets.rms[flip].path
    served = load_reward_model(path, Settings())
    assert served.info.input_format == "pair"
    assert served.info.max_input_tokens == 128
    items = [
        ("describe the sea", "waves salt shore"),
        ("tell me about the city in detail", "the bus and the crowd are big and the lights"),
        ("write about the garden briefly", "bees"),
    ]
    scores = served.forward(
        served.formatter.encode([RewardInput(prompt=p, response=r) for p, r in items], "none")
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        direct = [
            float(model(**tokenizer(p, r, return_tensors="pt")).logits[0, 0]) for p, r in items
        ]
    assert scores == pytest.approx(direct, abs=1e-5)
    assert len(set(direct)) == len(direct)


def test_build_reuses_what_the_manifest_records(assets: TaskAssets) -> None:
    weights = [
        assets.sft / "model.safetensors",
        *(rm.path / "model.safetensors" for rm in assets.rms.values()),
    ]
    before = [w.stat().st_mtime_ns for w in weights]
    workdir = assets.sft.parent
    again = build_assets(workdir, noise_levels=(0.0, 0.4), quiet=True, **SIZES)
    assert again == assets
    assert [w.stat().st_mtime_ns for w in weights] == before
    assert len(read_prompt_file(again.train_prompts)) == SIZES["train_prompts"]
    assert {line.prompt for line in read_prompt_file(again.eval_prompts)} == set(TASK.all_prompts())


def test_a_changed_setting_rebuilds_only_what_depends_on_it(tmp_path: Path) -> None:
    small = {"train_prompts": 4, "sft_steps": 2, "rm_steps": 2, "rm_pairs": 64}
    first = build_assets(tmp_path, noise_levels=(0.0,), quiet=True, **small)
    tokenizer_files = first.tokenizer / "tokenizer.json"
    rm_weights = first.rms[0.0].path / "model.safetensors"
    sft_weights = first.sft / "model.safetensors"
    stamps = [p.stat().st_mtime_ns for p in (tokenizer_files, rm_weights, sft_weights)]
    build_assets(tmp_path, noise_levels=(0.0,), quiet=True, **{**small, "sft_steps": 3})
    after = [p.stat().st_mtime_ns for p in (tokenizer_files, rm_weights, sft_weights)]
    assert after[:2] == stamps[:2]
    assert after[2] != stamps[2]
    assert not list(tmp_path.glob("*.partial"))
