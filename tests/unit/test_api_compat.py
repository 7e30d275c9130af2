"""``POST /get_reward`` in process with the fake engine: settings and auth."""

from __future__ import annotations

import pytest

from tests.unit.fake_engine import FakeEngine, serve
from tests.unit.test_api import assert_envelope, make_app, run


@pytest.mark.parametrize(("on_missing", "expected"), [("raw", 0.3), ("zero", 0.0)])
def test_a_prompt_without_baseline_gets_what_the_setting_says(
    on_missing: str, expected: float
) -> None:
    async def body() -> None:
        app = make_app(FakeEngine(), get_reward_on_missing=on_missing)
        async with serve(app) as client:
            response = await client.post(
                "/get_reward", json={"query": ["P:abc"], "prompts": ["P:"]}
            )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["scores"] == [pytest.approx(0.3)]  # the fake: len("abc") / 10
        assert answer["rewards"] == [pytest.approx(expected)]
        assert answer["extra_logs"]["baseline_missing"] == [1.0]

    run(body())


def test_get_reward_needs_the_api_token_when_one_is_set() -> None:
    async def body() -> None:
        app = make_app(FakeEngine(), api_tokens="tok-aaaaaaaa")
        async with serve(app) as client:
            refused = await client.post("/get_reward", json={"query": []})
            assert_envelope(refused, 401, "unauthorized")
            headers = {"Authorization": "Bearer tok-aaaaaaaa"}
            allowed = await client.post("/get_reward", json={"query": []}, headers=headers)
        assert allowed.status_code == 200, allowed.text

    run(body())
