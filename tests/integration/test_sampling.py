"""`crs-trainer sample-baselines` against a tiny random causal LM with a real tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.models import save_tiny_policy
from trainer_client.baselines.sampling import prompt_text
from trainer_client.cli import main
from trainer_client.prompt_id import prompt_id

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Why is the sky blue?"},
]
PROMPTS: list[dict[str, Any]] = [
    {"prompt": "What is the capital of France?", "prompt_id": "france"},
    {"prompt": "Please write a short poem about the ocean at night."},
    {"prompt": MESSAGES},
    {"prompt": "Can you explain how a neural network learns from data?"},
    {"prompt": "Mix flour, sugar, two eggs and butter.", "prompt_id": "cake"},
]
FAST = ["-k", "3", "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def policy(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama causal LM sharing the tiny reward model's tokenizer (chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert tokenizer.chat_template
    return save_tiny_policy(tokenizer, tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def plain_policy(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of policy with a tokenizer that has no chat template."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = None
    return save_tiny_policy(tokenizer, tmp_path_factory.mktemp("plain-policy"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sample(policy: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(
        ["sample-baselines", "--policy", str(policy), "--prompts", str(prompts)]
        + ["--out", str(out), *FAST, *extra]
    )


@pytest.mark.parametrize("which", ["policy", "plain_policy"])
def test_k_responses_per_prompt_with_ids(
    which: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir: Path = request.getfixturevalue(which)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "nested" / "baselines.jsonl"

    assert sample(model_dir, prompts, out) == 0

    records = read_jsonl(out)
    expected_ids = [prompt_id(row["prompt"], row.get("prompt_id")) for row in PROMPTS]
    assert [r["prompt_id"] for r in records] == expected_ids
    assert expected_ids[0] == "france"
    assert expected_ids[2] == prompt_id(MESSAGES)
    assert [r["prompt"] for r in records] == [row["prompt"] for row in PROMPTS]
    for record in records:
        assert set(record) == {"prompt_id", "prompt", "responses"}
        assert len(record["responses"]) == 3
        assert all(isinstance(response, str) for response in record["responses"])
        # Only the new tokens are decoded: the prompt itself is not echoed back.
        text = record["prompt"] if isinstance(record["prompt"], str) else MESSAGES[1]["content"]
        assert all(text not in response for response in record["responses"])
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1
    assert "sampled 5 prompts, skipped 0" in summary[0]
    assert str(out) in summary[0]


def test_prompt_text_uses_the_chat_template_when_there_is_one(
    policy: Path, plain_policy: Path
) -> None:
    chat = AutoTokenizer.from_pretrained(policy)
    assert prompt_text(chat, "Hi?") == "<s><|user|>\nHi?</s>\n<|assistant|>\n"
    assert prompt_text(chat, MESSAGES) == (
        "<s><|system|>\nYou are terse.</s>\n<|user|>\nWhy is the sky blue?</s>\n<|assistant|>\n"
    )
    plain = AutoTokenizer.from_pretrained(plain_policy)
    assert not plain.chat_template
    assert prompt_text(plain, "Hi?") == "Hi?"
    assert prompt_text(plain, MESSAGES) == "system: You are terse.\nuser: Why is the sky blue?"


def test_same_seed_same_output_other_seed_other_output(policy: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    runs = {name: tmp_path / f"{name}.jsonl" for name in ("seed7", "seed7-again", "seed8")}
    assert sample(policy, prompts, runs["seed7"], "--seed", "7") == 0
    assert sample(policy, prompts, runs["seed7-again"], "--seed", "7") == 0
    assert sample(policy, prompts, runs["seed8"], "--seed", "8") == 0

    assert runs["seed7"].read_bytes() == runs["seed7-again"].read_bytes()
    seven, eight = read_jsonl(runs["seed7"]), read_jsonl(runs["seed8"])
    assert [r["responses"] for r in seven] != [r["responses"] for r in eight]


def test_resume_skips_done_prompts(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "baselines.jsonl"
    first = write_jsonl(tmp_path / "first.jsonl", PROMPTS[:2])
    assert sample(policy, first, out) == 0
    before = out.read_text(encoding="utf-8")
    capsys.readouterr()

    everything = write_jsonl(tmp_path / "all.jsonl", PROMPTS)
    assert sample(policy, everything, out) == 0

    assert out.read_text(encoding="utf-8").startswith(before)  # done lines left alone
    ids = [r["prompt_id"] for r in read_jsonl(out)]
    assert ids == [prompt_id(row["prompt"], row.get("prompt_id")) for row in PROMPTS]
    assert "sampled 3 prompts, skipped 2" in capsys.readouterr().out


def test_resume_repairs_a_truncated_last_line(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "baselines.jsonl"
    assert sample(policy, prompts, out) == 0
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    # A crash in the middle of writing the last line leaves half of it, without its newline.
    out.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
    capsys.readouterr()

    assert sample(policy, prompts, out) == 0

    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert text.startswith("".join(lines[:-1]))
    records = read_jsonl(out)  # every line parses again
    assert [r["prompt_id"] for r in records] == [
        prompt_id(row["prompt"], row.get("prompt_id")) for row in PROMPTS
    ]
    assert "sampled 1 prompts, skipped 4" in capsys.readouterr().out


def test_a_repeated_prompt_is_sampled_once(policy: Path, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [PROMPTS[1], PROMPTS[2], PROMPTS[1]])
    out = tmp_path / "baselines.jsonl"
    assert sample(policy, prompts, out) == 0
    assert [r["prompt"] for r in read_jsonl(out)] == [PROMPTS[1]["prompt"], MESSAGES]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt_id": "x"}', "'prompt' must be"),
        ('{"prompt": ""}', "empty string"),
        ('{"prompt": []}', "'prompt' must be"),
        ('{"prompt": [{"role": "robot", "content": "hi"}]}', "role must be one of"),
        ('{"prompt": [{"role": "user"}]}', "exactly 'role' and 'content'"),
        ('{"prompt": "hi", "prompt_id": 3}', "'prompt_id' must be a non-empty string"),
        ('{"prompt": "a", "prompt_id": "france"}', "names two different prompts"),
    ],
)
def test_a_bad_line_is_refused_with_its_line_number(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n\n" + line + "\n", encoding="utf-8")
    out = tmp_path / "baselines.jsonl"

    assert sample(policy, prompts, out) == 2

    error = capsys.readouterr().err
    assert message in error
    assert ":3" in error or "lines 1 and 3" in error  # the blank line 2 still counts
    assert not out.exists()  # refused before any sampling


def test_a_corrupt_line_inside_the_output_is_not_overwritten(
    policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "baselines.jsonl"
    out.write_text('{"prompt_id": "france", "responses": []}\n{garbage\n', encoding="utf-8")
    assert sample(policy, prompts, out) == 2
    assert f"{out}:2" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8").endswith("{garbage\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [(["-k", "0"], "k must be >= 1"), (["--top-p", "0"], "top_p must be in")],
)
def test_bad_options_are_usage_errors(
    policy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    assert sample(policy, prompts, tmp_path / "out.jsonl", *args) == 2
    assert message in capsys.readouterr().err


def test_a_directory_without_a_model_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    assert sample(tmp_path, prompts, tmp_path / "out.jsonl") == 2
    assert "cannot load a causal LM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module", ["trainer_client", "trainer_client.baselines.sampling", "trainer_client.cli"]
)
def test_importing_does_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
