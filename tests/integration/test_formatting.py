"""Input formatting and batching never change a score: batch mates, padding side, truncation."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.scoring.formatting import Formatter, resolve_input_format
from service.scoring.model import RewardModel, load_reward_model
from service.scoring.types import EmptyInput, InputTooLong, RewardInput
from service.settings import Settings
from tests.models import DirectScorer, mixed_items

ALONE = RewardInput(prompt="Is the sky blue?", response="Yes, on a clear day.")


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_bert"])
def loaded(request: pytest.FixtureRequest) -> RewardModel:
    return load_reward_model(request.getfixturevalue(request.param), Settings())


def test_score_does_not_depend_on_batch_mates(loaded: RewardModel) -> None:
    mates = [RewardInput(prompt=i["prompt"], response=i["response"]) for i in mixed_items(7)]
    alone = loaded.forward(loaded.formatter.encode([ALONE], "none"))[0]
    for position in (0, 3, 7):
        batch = [*mates[:position], ALONE, *mates[position:]]
        together = loaded.forward(loaded.formatter.encode(batch, "none"))
        assert together[position] == pytest.approx(alone, abs=1e-5)


def test_padding_side_of_the_tokenizer_does_not_matter(tiny_llama: Path, tmp_path: Path) -> None:
    left = shutil.copytree(tiny_llama, tmp_path / "left-padded")
    config = (left / "tokenizer_config.json").read_text()
    (left / "tokenizer_config.json").write_text(config.replace("{", '{"padding_side": "left",', 1))
    items = [RewardInput(prompt=i["prompt"], response=i["response"]) for i in mixed_items(8)]
    right_model = load_reward_model(tiny_llama, Settings())
    left_model = load_reward_model(left, Settings())
    assert left_model.formatter.tokenizer.padding_side == "left"
    expected = right_model.forward(right_model.formatter.encode(items, "none"))
    assert left_model.forward(left_model.formatter.encode(items, "none")) == pytest.approx(
        expected, abs=1e-5
    )
    assert expected == pytest.approx(
        DirectScorer(tiny_llama).rewards(
            [{"prompt": i.prompt, "response": i.response} for i in items]
        ),
        abs=1e-4,
    )


def test_chat_format_renders_the_template_once(tiny_llama: Path) -> None:
    loaded = load_reward_model(tiny_llama, Settings())
    assert loaded.info.input_format == "chat"
    (encoded,) = loaded.formatter.encode([ALONE], "none")
    tokenizer = loaded.formatter.tokenizer
    text = tokenizer.decode(encoded.input_ids)
    assert text.count(tokenizer.bos_token) == 1
    assert "<|user|>\nIs the sky blue?" in text
    assert "<|assistant|>\nYes, on a clear day." in text


def test_pair_format_for_encoders(tiny_bert: Path) -> None:
    loaded = load_reward_model(tiny_bert, Settings())
    assert loaded.info.input_format == "pair"
    (encoded,) = loaded.formatter.encode([ALONE], "none")
    assert encoded.token_type_ids is not None
    assert encoded.token_type_ids[0] == 0
    assert encoded.token_type_ids[-1] == 1


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_left_truncation_keeps_the_start_token_and_the_end(
    request: pytest.FixtureRequest, arch: str
) -> None:
    model_dir = request.getfixturevalue(arch)
    loaded = load_reward_model(model_dir, Settings(max_input_tokens=32))
    long_item = RewardInput(prompt="background " * 60, response="the final answer is four")
    with pytest.raises(InputTooLong, match="item 1 has"):
        loaded.formatter.encode([RewardInput(prompt="hi", response="ok"), long_item], "none")
    full = load_reward_model(model_dir, Settings()).formatter.encode([long_item], "none")[0]
    (cut,) = loaded.formatter.encode([long_item], "left")
    assert cut.truncated
    assert cut.length == 32
    assert cut.input_ids[0] == full.input_ids[0]  # BOS / CLS survives
    assert cut.input_ids[1:] == full.input_ids[-31:]  # the end: prompt's tail and the response
    assert "the final answer is four" in loaded.formatter.tokenizer.decode(cut.input_ids)


TOKENIZERS = ["tiny_llama", "tiny_gpt2", "tiny_bert", "minilm_rm"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def formatters(request: pytest.FixtureRequest) -> tuple[Formatter, Formatter]:
    """The formatter as loaded (through the fast backend) and the same one through the
    tokenizer's own call."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))
    input_format = resolve_input_format("auto", tokenizer)
    fast = Formatter(tokenizer, input_format, 256)
    wrapped = Formatter(tokenizer, input_format, 256)
    wrapped._backend = None
    return fast, wrapped


def pieces(formatter: Formatter) -> st.SearchStrategy[str]:
    """Text made of words, odd characters and the tokenizer's own special tokens."""
    specials = list(formatter.tokenizer.all_special_tokens) + ["<|user|>", "\n\n", "  "]
    words = st.one_of(st.text(max_size=12), st.sampled_from(specials), st.just("Paris."))
    return st.lists(words, max_size=12).map(" ".join)


def encoded_or_error(formatter: Formatter, items: list[RewardInput]) -> object:
    try:
        return formatter.encode(items, "left")
    except EmptyInput as exc:
        return ("empty", exc.indices)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_fast_backend_gives_the_tokenizers_own_tokens(
    formatters: tuple[Formatter, Formatter], data: st.DataObject
) -> None:
    fast, wrapped = formatters
    assert fast._backend is not None
    text = pieces(fast)
    items = data.draw(
        st.lists(
            st.one_of(
                st.builds(RewardInput, prompt=text, response=text),
                st.builds(RewardInput, text=text.filter(str.strip)),
            ),
            min_size=1,
            max_size=4,
        )
    )
    assert encoded_or_error(fast, items) == encoded_or_error(wrapped, items)


def test_the_fast_backend_keeps_a_long_item_cut_the_same(
    formatters: tuple[Formatter, Formatter],
) -> None:
    fast, wrapped = formatters
    long_item = RewardInput(prompt="background words " * 200, response="the answer is four")
    (cut,) = fast.encode([long_item], "left")
    assert cut.truncated
    assert [cut] == wrapped.encode([long_item], "left")


class SplitOnSpaces:
    """A custom Python pre-tokenizer: its tokenizer's backend cannot be serialised."""

    def pre_tokenize(self, pretok: Any) -> None:
        pretok.split(lambda _, piece: piece.split(" ", "isolated"))


def test_a_backend_that_cannot_be_copied_tokenizes_through_the_tokenizer(
    tiny_llama: Path,
) -> None:
    from tokenizers.pre_tokenizers import PreTokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.backend_tokenizer.pre_tokenizer = PreTokenizer.custom(SplitOnSpaces())
    with pytest.raises(Exception, match="(?i)serializ"):
        tokenizer.backend_tokenizer.to_str()
    formatter = Formatter(tokenizer, "chat", 256)
    assert formatter._backend is None
    (encoded,) = formatter.encode([ALONE], "none")
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": ALONE.prompt},
            {"role": "assistant", "content": ALONE.response},
        ],
        tokenize=False,
    )
    assert encoded.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
