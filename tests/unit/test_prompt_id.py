"""The prompt id of DESIGN.md section 5, checked against an independent computation."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from trainer_client import prompt_id

messages_st = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()}
    ),
    min_size=1,
    max_size=4,
)


@given(st.text())
def test_string_prompt_is_the_sha256_of_its_utf8(prompt: str) -> None:
    expected = "sha256:" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    assert prompt_id(prompt) == expected


@given(messages_st)
def test_messages_hash_their_canonical_json(messages: list[dict[str, str]]) -> None:
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert prompt_id(messages) == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    reordered = [{"content": m["content"], "role": m["role"]} for m in messages]
    assert prompt_id(reordered) == prompt_id(messages)


def test_the_clients_id_wins_and_ids_differ() -> None:
    assert prompt_id("anything", "my-id") == "my-id"
    assert prompt_id("a") != prompt_id("b")
    assert prompt_id("héllo") == ("sha256:" + hashlib.sha256("héllo".encode()).hexdigest())
