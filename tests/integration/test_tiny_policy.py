"""`crs-trainer tiny-policy`: a tiny random causal LM with a chat template that loads through the
ordinary Hugging Face classes and generates; seeded, and refusing to overwrite a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer_client.cli import EXIT_OK, EXIT_USAGE, main
from trainer_client.tiny_policy import TinyPolicyError, build_tiny_policy


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built by the command without --tokenizer: its tokenizer from `service tiny-model`."""
    out = tmp_path_factory.mktemp("tiny-policy") / "policy"
    assert main(["tiny-policy", str(out)]) == EXIT_OK
    return out


def test_it_loads_has_a_chat_template_and_generates(policy: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(policy, local_files_only=True).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    assert isinstance(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]), str)


def weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(path / "model.safetensors"))


def test_the_seed_decides_the_weights(policy: Path, tmp_path: Path) -> None:
    import torch

    same = build_tiny_policy(tmp_path / "same", tokenizer_dir=policy, seed=0)
    other = build_tiny_policy(tmp_path / "other", tokenizer_dir=policy, seed=1)
    reference, again, changed = weights(policy), weights(same), weights(other)
    assert reference.keys() == again.keys() == changed.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert not all(torch.equal(reference[k], changed[k]) for k in reference)


def test_a_tokenizer_without_a_chat_template_gets_one(policy: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    plain = tmp_path / "plain-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(plain, local_files_only=True).chat_template
    built = build_tiny_policy(tmp_path / "p", tokenizer_dir=plain)
    assert AutoTokenizer.from_pretrained(built, local_files_only=True).chat_template


def test_a_non_empty_target_is_refused(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TinyPolicyError, match="not an empty directory"):
        build_tiny_policy(policy, tokenizer_dir=policy)
    assert main(["tiny-policy", str(policy), "--tokenizer", str(policy)]) == EXIT_USAGE
    assert "not an empty directory" in capsys.readouterr().err


def test_a_missing_tokenizer_directory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["tiny-policy", str(tmp_path / "p"), "--tokenizer", str(tmp_path / "nowhere")])
    assert code == EXIT_USAGE
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
