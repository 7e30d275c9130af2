"""Uploads through the HTTP API (the app with the fake engine) into a real ``redis-server``, with
faults in between: a reply held past the socket timeout, a connection cut mid-pipeline, Redis out
of memory, values crs did not write. Whatever is retried, every append lands exactly once, and
every per-prompt "stored" answer is what Redis holds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from service.baselines.redis_store import PROMPTS_INDEX, responses_key, rewards_key
from tests.redis_fault_proxy import RedisFaultProxy
from tests.unit.fake_engine import FAKE_VERSION, FakeEngine, serve
from tests.unit.test_api import make_app, metric
from trainer_client.launch import RedisProcess

PROMPTS = ["alpha", "beta", "gamma"]
RETRIED = {"not_ready", "conflict"}  # what a client retries (RewardClient's rule)
STORE = {
    "redis_socket_timeout_s": 0.25,
    "redis_connect_timeout_s": 0.25,
    "redis_retries": 1,
    "baseline_budget_s": 5.0,
    "store_cooldown_s": 0.0,
}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def proxy(own_redis: RedisProcess) -> Iterator[RedisFaultProxy]:
    with RedisFaultProxy(own_redis.port) as running:
        yield running


def batch(prompt: str, number: int, size: int = 2) -> list[str]:
    """Responses no other batch has, so Redis shows how often each batch was stored."""
    return [f"{prompt} batch {number} response {j}" for j in range(size)]


def item(prompt: str, responses: list[str], upload_id: str) -> dict[str, Any]:
    return {"prompt": prompt, "prompt_id": prompt, "responses": responses, "upload_id": upload_id}


async def held(redis: Redis, prompt: str) -> list[str]:
    """The responses Redis holds for a prompt (read directly, not through the proxy)."""
    raw = await redis.hget(responses_key(prompt), "responses")
    return [] if raw is None else list(json.loads(raw))


async def check_answer(
    redis: Redis, answer: httpx.Response, uploaded: dict[str, list[str]]
) -> dict[str, Any]:
    """Every prompt said stored holds its batch once (and ``n`` is what is held), every prompt
    said not stored holds none of it; the index lists exactly the prompts held."""
    if answer.status_code != 200:
        assert answer.status_code in (503, 507), answer.text
        results = answer.json()["error"]["details"]["results"]
    else:
        results = answer.json()["results"]
    for result in results:
        responses = await held(redis, result["prompt_id"])
        times = [responses.count(r) for r in uploaded[result["prompt_id"]]]
        if result["stored"]:
            assert times == [1] * len(times), (result, responses)
            assert result["n"] == len(responses), (result, responses)
        else:
            assert times == [0] * len(times), (result, responses)
    indexed = await redis.smembers(PROMPTS_INDEX)
    stored = {pid for pid in uploaded if await held(redis, pid)}
    assert indexed == stored
    return {result["prompt_id"]: result for result in results}


async def upload_with_retries(
    client: httpx.AsyncClient,
    redis: Redis,
    items: list[dict[str, Any]],
    mode: str,
    prior: dict[str, list[str]] | None = None,
) -> list[httpx.Response]:
    """PUT, then PUT again what was not stored (same upload ids) while a retry can help, as a
    client does; then once more the whole upload, as a client whose answer was lost does."""
    uploaded = {i["prompt_id"]: i["responses"] for i in items}
    answers = []
    todo = items
    for _ in range(4):
        answer = await client.put("/v1/baselines", json={"items": todo, "mode": mode})
        answers.append(answer)
        results = await check_answer(redis, answer, uploaded)
        todo = [i for i in todo if retry(results[i["prompt_id"]])]
        if not todo:
            break
    assert not todo, [a.text for a in answers]
    again = await client.put("/v1/baselines", json={"items": items, "mode": mode})
    assert again.status_code == 200, again.text
    results = await check_answer(redis, again, uploaded)
    for pid, responses in uploaded.items():
        assert await held(redis, pid) == (prior or {}).get(pid, []) + responses
        if mode == "append":
            assert results[pid]["duplicate"] is True
    return [*answers, again]


def retry(result: dict[str, Any]) -> bool:
    return not result["stored"] and result["error_type"] in RETRIED


@contextlib.asynccontextmanager
async def app_on(url: str, redis_port: int, **settings: Any) -> AsyncIterator[Any]:
    """A client of the app storing in Redis at ``url``, and a direct client of the real server."""
    app = make_app(FakeEngine(), redis_url=url, **{**STORE, **settings})
    redis = Redis(port=redis_port, decode_responses=True)
    try:
        async with serve(app) as client:
            yield client, redis
    finally:
        await redis.aclose()


async def replace_first(client: httpx.AsyncClient) -> dict[str, list[str]]:
    """Store batch 0 of every prompt, fault-free; returns it."""
    prior = {p: batch(p, 0) for p in PROMPTS}
    items = [item(p, prior[p], f"u0-{p}") for p in PROMPTS]
    answer = await client.put("/v1/baselines", json={"items": items})
    assert answer.status_code == 200, answer.text
    return prior


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_a_reply_held_past_the_socket_timeout_lands_once(
    own_redis: RedisProcess, proxy: RedisFaultProxy, mode: str
) -> None:
    async def body() -> None:
        async with app_on(proxy.url, own_redis.port) as (client, redis):
            prior = await replace_first(client)
            proxy.hold_reply(b"EVALSHA")  # Redis runs the write; its reply never comes back
            items = [item(p, batch(p, 1), f"u1-{p}") for p in PROMPTS]
            await upload_with_retries(
                client, redis, items, mode, prior if mode == "append" else None
            )
        assert proxy.fired == 1

    asyncio.run(body())


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_a_connection_cut_mid_pipeline_lands_each_prompt_once(
    own_redis: RedisProcess, proxy: RedisFaultProxy, mode: str
) -> None:
    async def body() -> None:
        async with app_on(proxy.url, own_redis.port) as (client, redis):
            prior = await replace_first(client)
            # Replace sends the three prompts in one pipeline: two run, then the cut. An append
            # writes each prompt on its own: the second one runs, then its connection is cut.
            proxy.cut_after(b"EVALSHA", count=2)
            items = [item(p, batch(p, 1), f"u1-{p}") for p in PROMPTS]
            await upload_with_retries(
                client, redis, items, mode, prior if mode == "append" else None
            )
        assert proxy.fired == 1

    asyncio.run(body())


def test_out_of_memory_answers_what_was_stored_and_is_not_not_ready(
    own_redis: RedisProcess,
) -> None:
    # Each prompt writes 1.3 x big; Redis checks memory before each write, with the pipeline's
    # next command (about 2 x big) read: at 3.1 x big the first fits, the second does not.
    big = 256 * 1024

    async def body() -> None:
        async with app_on(own_redis.url, own_redis.port) as (client, redis):
            applied = [item("alpha", ["small"], "u-alpha")]
            warm = await client.put("/v1/baselines", json={"items": applied, "mode": "append"})
            assert warm.status_code == 200, warm.text  # both connection pools are open now
            await redis.config_set("maxmemory-policy", "noeviction")
            used = int((await redis.info("memory"))["used_memory"])
            await redis.config_set("maxmemory", str(used + big * 31 // 10))
            items = [item(p, [p[0] * big], f"u-big-{p}") for p in PROMPTS]
            uploaded = {i["prompt_id"]: i["responses"] for i in items}
            answer = await client.put("/v1/baselines", json={"items": items})
            assert answer.status_code == 200, answer.text
            results = await check_answer(redis, answer, uploaded)
            stored = [pid for pid, result in results.items() if result["stored"]]
            assert 0 < len(stored) < len(PROMPTS), results  # partly applied
            for result in results.values():
                if not result["stored"]:
                    assert result["error_type"] == "store_full"
                    assert "out of memory" in result["error"]
            summary = (await client.get("/v1/baselines")).json()
            assert summary["prompts"] == len(await redis.smembers(PROMPTS_INDEX))
            # What was stored is served; nothing new fits: 507, and no Retry-After.
            rewards = await client.post(
                "/v1/rewards",
                json={"items": [{"prompt": "x", "prompt_id": stored[0], "response": "r"}]},
            )
            assert rewards.json()["results"][0]["baseline_source"] == "cache"
            fresh = [item("delta", ["d" * big], "u-delta")]
            full = await client.put("/v1/baselines", json={"items": fresh})
            assert full.status_code == 507, full.text
            assert full.json()["error"]["type"] == "store_full"
            assert "retry-after" not in full.headers
            # An append applied before is answered as such, even now (it writes nothing).
            again = await client.put("/v1/baselines", json={"items": applied, "mode": "append"})
            assert again.status_code == 200, again.text
            assert again.json()["results"][0]["duplicate"] is True
            await redis.config_set("maxmemory", "0")

    asyncio.run(body())


def test_values_crs_did_not_write_cost_only_their_own_prompt(
    own_redis: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with app_on(own_redis.url, own_redis.port, store_cooldown_s=60) as (client, redis):
            await replace_first(client)  # alpha, beta and gamma stored and scored
            await redis.set(responses_key("wrongtype"), "not a hash")
            await redis.hset(
                responses_key("badjson"), mapping={"digest": "d", "prompt": "{", "responses": "["}
            )
            await redis.set(rewards_key("beta", FAKE_VERSION), "{not json")
            asked = ["alpha", "wrongtype", "badjson", "beta"]
            items = [{"prompt": "x", "prompt_id": pid, "response": "r"} for pid in asked]
            sources = []
            for _ in range(2):  # the second request would be "unavailable" in a cool-down
                answer = await client.post("/v1/rewards", json={"items": items})
                assert answer.status_code == 200, answer.text
                sources.append([r["baseline_source"] for r in answer.json()["results"]])
            assert sources == [
                ["cache", "missing", "missing", "computed"],  # beta's rewards scored again
                ["cache", "missing", "missing", "cache"],
            ]
            for pid in ("wrongtype", "badjson"):
                assert (await client.get(f"/v1/baselines/{pid}")).status_code == 404
            append = [
                {"prompt": "x", "prompt_id": pid, "responses": [f"{pid} more"]}
                for pid in ("alpha", "wrongtype", "badjson")
            ]
            answer = await client.put("/v1/baselines", json={"items": append, "mode": "append"})
            assert answer.status_code == 200, answer.text
            alpha, wrongtype, badjson = answer.json()["results"]
            assert (alpha["stored"], alpha["n"]) == (True, 3)
            for refused in (wrongtype, badjson):
                assert refused["stored"] is False
                assert refused["error_type"] == "corrupt_entry"
                assert "corrupt entry" in refused["error"]
            summary = await client.get("/v1/baselines")
            assert summary.status_code == 200, summary.text
            text = (await client.get("/metrics")).text
        assert (metric(text, "crs_store_corrupt_total", {"reason": "wrong_type"}) or 0) >= 2
        assert (metric(text, "crs_store_corrupt_total", {"reason": "bad_value"}) or 0) >= 2
        logged = [r.getMessage() for r in caplog.records if r.name == "crs.baselines.redis"]
        for key in (responses_key("wrongtype"), responses_key("badjson")):
            assert sum(key in line for line in logged) == 1, logged  # once, however often met
        assert not any("not a hash" in line or "{not json" in line for line in logged)

    with caplog.at_level(logging.WARNING, logger="crs.baselines.redis"):
        asyncio.run(body())
