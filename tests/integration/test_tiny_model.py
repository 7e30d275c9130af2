"""The tiny random reward models load like real Hugging Face checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.scoring.tiny import TinyArch, build_tiny_model

pytestmark = pytest.mark.integration

ARCHS = ["llama", "bert"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Build each kind once per module: several tests read the same checkpoint.
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ("llama", "bert")}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_cleanly_and_scores(built: dict[str, Path], arch: TinyArch) -> None:
    path = built[arch]
    assert (path / "model.safetensors").is_file()
    assert not (path / "pytorch_model.bin").exists()
    weights = load_file(path / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}

    tokenizer = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, use_safetensors=True, output_loading_info=True
    )
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert model.config.num_labels == 1
    assert model.config.id2label == {0: "reward"}
    assert model.config.pad_token_id == tokenizer.pad_token_id

    batch = tokenizer("What is 2 + 2?", "It is 4.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 1)
    assert torch.isfinite(logits).all()


def test_llama_chat_template(built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built["llama"])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_bert_has_no_chat_template(built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built["bert"])
    assert tokenizer.chat_template is None


def test_llama_byte_level_round_trips_unicode(built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built["llama"])
    text = "héllo 🌍 κόσμε"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_bert_wordpiece_round_trips_plain_text(built: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built["bert"])
    ids = tokenizer("Hello, World 42! Unbelievable.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == "hello, world 42! unbelievable."


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_determines_weights(tmp_path: Path, arch: TinyArch) -> None:
    first = build_tiny_model(tmp_path / "a", arch, seed=1)
    again = build_tiny_model(tmp_path / "b", arch, seed=1)
    other = build_tiny_model(tmp_path / "c", arch, seed=2)
    weights = (first / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    # Tokenizer training is deterministic too, so the whole checkpoint is reproducible.
    assert (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        build_tiny_model(tmp_path, "bert")
    assert [p.name for p in tmp_path.iterdir()] == ["stale.txt"]


def test_creates_missing_parents(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "dir"
    assert build_tiny_model(target, "bert") == target
    assert (target / "config.json").is_file()
