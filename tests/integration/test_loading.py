"""The real Hugging Face loading path: what it accepts, what it refuses and why."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from service.metrics import Metrics
from service.scoring.model import load_reward_model, preflight
from service.scoring.types import ModelLoadError, RewardInput
from service.settings import Settings
from tests.models import DirectScorer


def two_label_model(source: Path, out: Path) -> Path:
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, ignore_mismatched_sizes=True
    ).save_pretrained(out)
    shutil.copy(source / "tokenizer.json", out)
    shutil.copy(source / "tokenizer_config.json", out)
    return out


def test_two_labels_are_refused_with_a_hint(tiny_bert: Path, tmp_path: Path) -> None:
    model_dir = two_label_model(tiny_bert, tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"num_labels=2.*label-index"):
        preflight(model_dir, Settings())


def test_label_index_picks_the_reward_logit(tiny_bert: Path, tmp_path: Path) -> None:
    model_dir = two_label_model(tiny_bert, tmp_path / "m")
    loaded = load_reward_model(model_dir, Settings(label_index=1))
    direct = DirectScorer(model_dir)
    responses = ["yes", "no, and here is a longer answer"]
    encoded = loaded.formatter.encode(
        [RewardInput(prompt="p", response=r) for r in responses], "none"
    )
    rewards = loaded.forward(encoded)
    with torch.no_grad():
        expected = [float(direct.model(**direct.encode("p", r)).logits[0, 1]) for r in responses]
    assert rewards == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ModelLoadError, match="out of range"):
        preflight(model_dir, Settings(label_index=2))


def pickle_only(source: Path, out: Path) -> Path:
    from safetensors.torch import load_file

    shutil.copytree(source, out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def test_pickle_weights_need_explicit_consent(tiny_bert: Path, tmp_path: Path) -> None:
    model_dir = pickle_only(tiny_bert, tmp_path / "m")
    with pytest.raises(ModelLoadError, match="pickle"):
        preflight(model_dir, Settings())
    loaded = load_reward_model(model_dir, Settings(allow_pickle_weights=True))
    assert loaded.info.max_input_tokens == 512


def test_base_model_without_a_score_head_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_bert)
    base.config.num_labels = 1
    base.save_pretrained(tmp_path / "m")
    shutil.copy(tiny_bert / "tokenizer.json", tmp_path / "m")
    shutil.copy(tiny_bert / "tokenizer_config.json", tmp_path / "m")
    with pytest.raises(ModelLoadError, match="random score head"):
        load_reward_model(tmp_path / "m", Settings())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(max_input_tokens=4096), "exceeds the model's maximum of 512"),
        (Settings(input_format="chat"), "chat template"),
    ],
    ids=["too-many-tokens", "chat-without-template"],
)
def test_settings_the_model_cannot_honour(
    tiny_bert: Path, settings: Settings, message: str
) -> None:
    with pytest.raises((ModelLoadError, ValueError), match=message):
        load_reward_model(tiny_bert, settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_asked_without_cuda(tiny_bert: Path) -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_reward_model(tiny_bert, Settings(device="cuda"))


def test_missing_directory_and_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        preflight(tmp_path / "absent", Settings())
    with pytest.raises(ModelLoadError, match="no config.json"):
        preflight(tmp_path, Settings())


def test_defaults_fp32_on_cpu_and_dtype_override(tiny_llama: Path) -> None:
    assert load_reward_model(tiny_llama, Settings()).info.dtype == "float32"
    assert load_reward_model(tiny_llama, Settings(dtype="bfloat16")).info.dtype == "bfloat16"


def test_version_digest_follows_the_weights(tiny_bert: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bert, tmp_path / "tiny-bert")
    before = load_reward_model(copy, Settings(model_name="rm")).info.version
    assert before.startswith("rm@")
    assert load_reward_model(copy, Settings(model_name="rm")).info.version == before
    (copy / "README.md").write_text("docs do not change the scores")
    assert load_reward_model(copy, Settings(model_name="rm")).info.version == before
    config = (
        (copy / "config.json")
        .read_text()
        .replace('"hidden_act"', '"classifier_dropout": 0.2, "hidden_act"')
    )
    (copy / "config.json").write_text(config)
    assert load_reward_model(copy, Settings(model_name="rm")).info.version != before


def test_a_model_giving_nan_fails_its_warm_up(tiny_bert: Path, tmp_path: Path) -> None:
    import asyncio

    from transformers import AutoModelForSequenceClassification

    from service.scoring.engine import HFRewardEngine

    broken = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with torch.no_grad():
        broken.classifier.bias.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_bert / name, tmp_path / "nan")

    async def score() -> None:
        engine = HFRewardEngine(tmp_path / "nan", Settings(), Metrics())
        try:
            await engine.astart()
        finally:
            await engine.astop()

    with pytest.raises(ModelLoadError, match="warm-up batch gave a non-finite reward"):
        asyncio.run(score())


def test_version_follows_every_serving_setting_that_changes_scores(
    tiny_bert: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    two = two_label_model(tiny_bert, tmp_path / "two")

    def version(model_dir: Path, **settings: Any) -> str:
        return load_reward_model(model_dir, Settings(model_name="rm", **settings)).info.version

    first = version(two, label_index=0)
    assert version(two, label_index=0) == first
    assert version(two, label_index=1) != first
    assert version(tiny_llama) == version(tiny_llama, input_format="chat")  # auto resolves so
    assert version(tiny_llama, input_format="pair") != version(tiny_llama)
    assert version(tiny_bert) == version(tiny_bert, max_input_tokens=512)  # the model's maximum
    assert version(tiny_bert, max_input_tokens=128) != version(tiny_bert)
    assert re.fullmatch(r"rm@[0-9a-f]{12}", first)


def with_config(source: Path, out: Path, **entries: Any) -> Path:
    copy = shutil.copytree(source, out)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **entries}))
    return copy


def test_openrlhf_normalised_rewards(tiny_llama: Path, tmp_path: Path) -> None:
    """OpenRLHF's reward model serves (reward - mean) / std when its config says so."""
    mean, std = 0.25, 0.5
    normalised = with_config(
        tiny_llama, tmp_path / "normalised", normalize_reward=True, mean=mean, std=std
    )
    loaded = load_reward_model(normalised, Settings(model_name="rm"))
    assert loaded.info.normalized
    pairs = [{"prompt": "Is it?", "response": r} for r in ("yes", "", "no, it is not")]
    served = loaded.forward(
        loaded.formatter.encode(
            [RewardInput(prompt="Is it?", response=p["response"]) for p in pairs], "none"
        )
    )
    direct = DirectScorer(tiny_llama).rewards(pairs)
    assert served == pytest.approx([(logit - mean) / std for logit in direct], abs=1e-5)
    plain = load_reward_model(tiny_llama, Settings(model_name="rm"))
    assert not plain.info.normalized
    assert loaded.info.version != plain.info.version
    # Asked to normalise without statistics: OpenRLHF's defaults, mean 0 and std 1.
    bare = with_config(tiny_llama, tmp_path / "bare", normalize_reward=True)
    assert load_reward_model(bare, Settings()).info.normalized


def test_normalisation_without_a_usable_std_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    broken = with_config(tiny_bert, tmp_path / "m", normalize_reward=True, mean=0.0, std=0.0)
    with pytest.raises(ModelLoadError, match="std must be positive"):
        load_reward_model(broken, Settings())


def test_a_full_size_warm_up_batch_fills_the_token_budget(tiny_llama: Path) -> None:
    from service.scoring.engine import check_full_batch, full_batch

    model = load_reward_model(tiny_llama, Settings(max_input_tokens=100))
    batch = full_batch(model, max_batch_tokens=1000)
    assert [item.length for item in batch] == [100] * 10
    check_full_batch(model, 1000)  # a model that fits passes


def test_a_model_whose_full_size_batch_fails_is_refused_with_what_to_change(
    tiny_llama: Path,
) -> None:
    """An out-of-memory on the warm-up's full batch fails the load (a hot swap keeps the old
    version) instead of the first big request."""
    import dataclasses

    from service.scoring.engine import check_full_batch
    from service.scoring.model import RewardModel

    class OutOfMemory(RewardModel):
        def forward(self, batch: Any) -> list[float]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = load_reward_model(tiny_llama, Settings())
    fields = {field.name: getattr(model, field.name) for field in dataclasses.fields(model)}
    with pytest.raises(ModelLoadError, match=r"full-size batch .*lower CRS_MAX_BATCH_TOKENS"):
        check_full_batch(OutOfMemory(**fields), 2048)
