"""The work per item is bounded before tokenising, empty renderings are refused, empty
responses are scored, and big requests cannot hold the tokenizer threads of small ones."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from service.app import create_app
from service.metrics import Metrics
from service.scoring import engine as engine_module
from service.scoring.engine import HFRewardEngine
from service.scoring.formatting import Formatter, conversation, input_chars, prompt_text
from service.scoring.types import EmptyInput, InputTooLong, Prompt, ResolvedFormat, RewardInput
from service.settings import Settings
from tests.models import WORDS

MAX_TOKENS = 32
# Words of several scripts and byte lengths, so cuts land inside multi-byte characters too.
VOCABULARY = (*WORDS, "naïve", "日本語の文", "Привет", "🙂🙃", "x=1;", "\n", "  ", "é", "ß")


class CountingTokenizer:
    """A real tokenizer that records how many characters each call is given."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None, **kw: Any) -> Any:
        sizes = [len(t) + len(p) for t, p in zip(texts, pairs or [""] * len(texts), strict=True)]
        self.calls.extend(sizes)
        return self._inner(texts, pairs, **kw)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_bert"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


class CountingBackend:
    """A formatter's fast backend that records, in ``counting``, the characters of each input."""

    def __init__(self, inner: Any, counting: CountingTokenizer) -> None:
        self._inner = inner
        self._counting = counting

    def encode_batch_fast(self, inputs: Sequence[str | tuple[str, str]], **kw: Any) -> Any:
        self._counting.calls.extend(
            len(i) if isinstance(i, str) else len(i[0]) + len(i[1]) for i in inputs
        )
        return self._inner.encode_batch_fast(inputs, **kw)


def formatter_of(tokenizer: Any) -> tuple[Formatter, CountingTokenizer]:
    """A formatter whose every tokenizer call, through the fast backend or not, is counted."""
    counting = CountingTokenizer(tokenizer)
    input_format: ResolvedFormat = "chat" if tokenizer.chat_template else "pair"
    formatter = Formatter(counting, input_format, MAX_TOKENS)
    assert formatter._backend is not None
    formatter._backend = CountingBackend(formatter._backend, counting)
    return formatter, counting


def full_then_left(tokenizer: Any, item: RewardInput) -> tuple[list[int], list[int] | None]:
    """The reference: the whole item tokenised, then cut from the left keeping the leading
    special tokens (at most 4, at most half the limit)."""
    with_types = "token_type_ids" in tokenizer.model_input_names
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            conversation(item.prompt, item.response), tokenize=False
        )
        encoding = tokenizer(text, add_special_tokens=False, return_token_type_ids=with_types)
    else:
        # As lists, as a batch is: a single call drops an empty second text (its truthiness).
        encoding = tokenizer([prompt_text(item.prompt)], [item.response])
    ids: list[int] = list(
        encoding["input_ids"][0] if not tokenizer.chat_template else encoding["input_ids"]
    )
    types: list[int] | None = None
    if with_types:
        types = list(
            encoding["token_type_ids"][0]
            if not tokenizer.chat_template
            else encoding["token_type_ids"]
        )
    specials = set(tokenizer.all_special_ids)
    head = 0
    while head < min(4, MAX_TOKENS // 2) and ids[head] in specials:
        head += 1
    tail = MAX_TOKENS - head
    cut_types = None if types is None else types[:head] + types[-tail:]
    return ids[:head] + ids[-tail:], cut_types


def words(draw: st.DrawFn, low: int, high: int) -> str:
    count = draw(st.integers(low, high))
    return " ".join(draw(st.lists(st.sampled_from(VOCABULARY), min_size=count, max_size=count)))


@st.composite
def long_items(draw: st.DrawFn) -> RewardInput:
    """Items over the character bound (32 tokens x 32 = 1024 characters) in every part."""
    long_part = draw(st.sampled_from(["prompt", "response", "both"]))
    text = words(draw, 500, 2500) if long_part != "response" else words(draw, 1, 20)
    response = words(draw, 500, 2500) if long_part != "prompt" else words(draw, 0, 20)
    prompt: Prompt = text
    if draw(st.booleans()):
        prompt = [
            {"role": "system", "content": words(draw, 1, 5)},
            {"role": "user", "content": text},
        ]
    return RewardInput(prompt=prompt, response=response)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(item=long_items())
def test_left_truncation_of_a_tail_equals_truncation_of_the_whole(
    tokenizer: Any, item: RewardInput
) -> None:
    formatter, counting = formatter_of(tokenizer)
    (encoded,) = formatter.encode([item], "left")
    ids, types = full_then_left(tokenizer, item)
    assert encoded.truncated
    assert encoded.input_ids == ids
    assert encoded.token_type_ids == types
    # Only a head and a tail were tokenised, never the whole item.
    assert max(counting.calls) <= (MAX_TOKENS + 16) * 32 < formatter.render(item).chars


def test_an_item_over_the_character_bound_is_refused_untokenised(tokenizer: Any) -> None:
    formatter, counting = formatter_of(tokenizer)
    huge = RewardInput(prompt="tell me " * 5000, response="no")
    small = RewardInput(prompt="hi", response="hello")
    with pytest.raises(InputTooLong, match=r"item 1 has \d+ characters") as refused:
        formatter.encode([small, huge], "none")
    assert set(refused.value.characters) == {1}
    assert refused.value.max_characters == MAX_TOKENS * 32
    assert max(counting.calls) < 100  # the small item alone was tokenised


def test_an_item_that_renders_to_no_tokens_is_refused(tiny_llama: Path) -> None:
    formatter, _ = formatter_of(AutoTokenizer.from_pretrained(tiny_llama))
    good = RewardInput(prompt="p", response="q", text="<s>hello</s>")
    empty = RewardInput(prompt="", response="", text="")
    with pytest.raises(EmptyInput, match="item 1 gives no tokens") as refused:
        formatter.encode([good, empty, good], "none")
    assert refused.value.indices == [1]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_an_empty_response_has_tokens_to_score(request: pytest.FixtureRequest, arch: str) -> None:
    formatter, _ = formatter_of(AutoTokenizer.from_pretrained(request.getfixturevalue(arch)))
    (encoded,) = formatter.encode([RewardInput(prompt="Say nothing.", response="")], "none")
    assert encoded.length > 0


def test_big_requests_do_not_hold_the_threads_of_small_ones(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two big requests stuck in tokenisation; a small one is still tokenised and scored."""
    release = threading.Event()
    started = threading.Semaphore(0)
    encode = Formatter.encode

    def stuck_when_big(self: Formatter, items: Sequence[RewardInput], truncation: Any) -> Any:
        if input_chars(items) > engine_module.BULK_REQUEST_CHARS:
            started.release()
            release.wait(60)
        return encode(self, items, truncation)

    monkeypatch.setattr(Formatter, "encode", stuck_when_big)
    asyncio.run(small_beside_big(tiny_bert, release, started))


async def small_beside_big(
    model: Path, release: threading.Event, started: threading.Semaphore
) -> None:
    engine = HFRewardEngine(model, Settings(truncation="left"), Metrics())
    await engine.astart()
    try:
        big = [RewardInput(prompt="word " * 60_000, response="a")]
        stuck = [asyncio.create_task(engine.score(big, truncation="left")) for _ in range(2)]
        await asyncio.to_thread(started.acquire, timeout=60)  # one big request is in
        small = [RewardInput(prompt="hi", response="hello")]
        # A generous failsafe, not a timing: before the fix this waits for the big ones.
        (score,) = await asyncio.wait_for(engine.score(small, truncation="none"), 30)
        assert score.tokens > 0
        assert not any(task.done() for task in stuck)
        release.set()
        for result in await asyncio.gather(*stuck):
            assert result[0].truncated
    finally:
        release.set()
        await engine.astop()


async def wait_ready(client: httpx.AsyncClient) -> None:
    async with asyncio.timeout(120):
        while (await client.get("/readyz")).status_code != 200:
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(model: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_path=model))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        LifespanManager(app, startup_timeout=120),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client,
    ):
        await wait_ready(client)
        yield client


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_bert"])
def test_an_empty_response_is_scored_as_its_rendering(
    request: pytest.FixtureRequest, arch: str
) -> None:
    model = request.getfixturevalue(arch)
    prompt = "Answer with nothing at all."
    direct = {response: direct_forward(model, prompt, response) for response in ("", "Fine.")}
    asyncio.run(empty_response_scored(model, prompt, direct))


def direct_forward(model_dir: Path, prompt: str, response: str) -> tuple[int, float]:
    """Tokens and reward of the item's rendering, by a plain transformers forward: the chat
    template, or the text pair [CLS] prompt [SEP] response [SEP] (with an empty response,
    [CLS] prompt [SEP] [SEP], as a batch of pairs renders it)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(conversation(prompt, response), tokenize=False)
        inputs = tokenizer([text], add_special_tokens=False, return_tensors="pt")
    else:
        inputs = tokenizer([prompt], [response], return_tensors="pt")
    with torch.no_grad():
        return inputs["input_ids"].shape[1], float(model(**inputs).logits[0, 0])


async def empty_response_scored(
    model: Path, prompt: str, direct: dict[str, tuple[int, float]]
) -> None:
    async with serving(model) as client:
        body = {"items": [{"prompt": prompt, "response": ""}], "contrastive": None}
        response = await client.post("/v1/rewards", json=body)
        assert response.status_code == 200, response.text
        [result] = response.json()["results"]
        tokens, reward = direct[""]
        assert result["tokens"] == tokens  # the same rendering, template or pair tokens
        assert result["reward"] == pytest.approx(reward, abs=1e-6)
        upload = {"items": [{"prompt": prompt, "responses": ["", "Fine."]}]}
        stored = await client.put("/v1/baselines", json=upload)
        assert stored.status_code == 200, stored.text
        [baseline] = stored.json()["results"]
        assert baseline["n"] == 2
        expected = (direct[""][1] + direct["Fine."][1]) / 2
        assert baseline["mean"] == pytest.approx(expected, abs=1e-6)


def test_an_empty_query_is_refused_by_its_index(tiny_llama: Path) -> None:
    asyncio.run(empty_query_refused(tiny_llama))


async def empty_query_refused(model: Path) -> None:
    async with serving(model) as client:
        body = {"query": ["<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n", ""]}
        response = await client.post("/get_reward", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert "item 1 " in error["message"]
        assert error["details"]["items"] == [{"index": 1, "tokens": 0}]
        # The service goes on scoring.
        again = await client.post("/get_reward", json={"query": body["query"][:1]})
        assert again.status_code == 200, again.text
