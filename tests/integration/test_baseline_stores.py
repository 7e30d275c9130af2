"""One behavioural suite, run on both baseline stores: the in-process one and Redis (a real
``redis-server`` of the test session's own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from service.baselines.memory import MemoryBaselineStore
from service.baselines.redis_store import connect
from service.baselines.store import BaselineStore, BaselineWrite, responses_digest
from service.settings import Settings
from trainer_client.launch import RedisProcess

T = TypeVar("T")
V1, V2 = "rm@111111111111", "rm@222222222222"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]


class NoMetrics:
    def __init__(self) -> None:
        self.ops: list[tuple[str, bool]] = []

    def store_op(self, op: str, seconds: float, failed: bool) -> None:
        self.ops.append((op, failed))


def write(pid: str, responses: list[str], version: str = V1, prompt: Any = "P") -> BaselineWrite:
    rewards = [float(len(r)) for r in responses]
    return BaselineWrite(
        prompt_id=pid, prompt=prompt, responses=responses, version=version, rewards=rewards
    )


@pytest.fixture(params=["memory", "redis"])
def with_store(
    request: pytest.FixtureRequest, redis_server: RedisProcess
) -> Callable[[Callable[[BaselineStore], Awaitable[T]]], T]:
    """Runs a test body against a fresh store of each kind, on its own event loop."""

    def run(body: Callable[[BaselineStore], Awaitable[T]]) -> T:
        async def main() -> T:
            async with open_store(request.param, redis_server) as store:
                return await body(store)

        return asyncio.run(main())

    return run


class open_store:  # noqa: N801 - an async context manager named like a function
    def __init__(self, kind: str, server: RedisProcess) -> None:
        self.kind, self.server = kind, server

    async def __aenter__(self) -> BaselineStore:
        if self.kind == "memory":
            self.store: BaselineStore = MemoryBaselineStore()
        else:
            self.store = connect(Settings(redis_url=self.server.url), NoMetrics())
            await self.store._client.flushdb()  # type: ignore[attr-defined]
        return self.store

    async def __aexit__(self, *exc: object) -> None:
        await self.store.aclose()


def test_an_absent_prompt_is_left_out(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        assert await store.lookup(["nope"], V1) == {}
        assert await store.counts(V1) == (0, 0)

    with_store(body)


def test_written_rewards_are_a_hit_for_their_version_only(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        assert await store.write([write("p", ["a", "bb", "ccc"])]) == [True]
        hit = (await store.lookup(["p"], V1))["p"]
        assert hit.rewards == [1.0, 2.0, 3.0]
        assert hit.responses is None  # a hit does not load the texts
        other = (await store.lookup(["p"], V2))["p"]
        assert other.rewards is None
        assert other.responses == ["a", "bb", "ccc"]
        assert other.prompt == "P"
        assert other.digest == hit.digest == responses_digest(["a", "bb", "ccc"])

    with_store(body)


def test_a_batch_lookup_answers_each_prompt(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        for n in range(10):
            await store.write([write(f"p{n}", ["x" * (n + 1)], version=V1 if n % 2 else V2)])
        found = await store.lookup([f"p{n}" for n in range(12)], V1)
        assert sorted(found) == [f"p{n}" for n in range(10)]
        assert [found[f"p{n}"].rewards for n in range(10)] == [
            [float(n + 1)] if n % 2 else None for n in range(10)
        ]

    with_store(body)


def test_chat_prompts_and_unicode_round_trip(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        responses = ["ünïcödé ✓", 'quotes " and \\ and \n newlines', "plain"]
        await store.write([write("sha256:abc", responses, prompt=CHAT)])
        found = (await store.lookup(["sha256:abc"], V1, with_responses=True))["sha256:abc"]
        assert found.responses == responses
        assert found.prompt == CHAT

    with_store(body)


def test_the_same_responses_again_keep_other_versions_rewards(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        await store.write([write("p", ["a", "b"], version=V1)])
        await store.write([write("p", ["a", "b"], version=V2)])  # idempotent replace under V2
        assert (await store.lookup(["p"], V1))["p"].rewards == [1.0, 1.0]
        assert (await store.lookup(["p"], V2))["p"].rewards == [1.0, 1.0]

    with_store(body)


def test_new_responses_invalidate_other_versions_rewards(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        await store.write([write("p", ["a", "b"], version=V1)])
        await store.write([write("p", ["xx", "yy"], version=V2)])
        stale = (await store.lookup(["p"], V1))["p"]
        assert stale.rewards is None  # V1's rewards scored other responses
        assert stale.responses == ["xx", "yy"]
        assert await store.counts(V1) == (1, 0)
        assert await store.counts(V2) == (1, 1)

    with_store(body)


def test_cached_rewards_become_hits(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        await store.write([write("p", ["a", "b"], version=V1)])
        miss = (await store.lookup(["p"], V2))["p"]
        await store.cache_rewards("p", miss.digest, V2, [0.5, -0.5])
        assert (await store.lookup(["p"], V2))["p"].rewards == [0.5, -0.5]
        # Rewards cached for responses that are gone meanwhile are never used.
        await store.write([write("p", ["c"], version=V1)])
        await store.cache_rewards("p", miss.digest, V2, [9.0, 9.0])
        assert (await store.lookup(["p"], V2))["p"].rewards is None

    with_store(body)


def test_a_conditional_write_needs_the_expected_digest(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        assert await store.write([write("p", ["a"])], [""]) == [True]  # absent: ok
        assert await store.write([write("p", ["zz"])], [""]) == [False]  # now present
        assert await store.write([write("p", ["zz"])], ["not-the-digest"]) == [False]
        assert (await store.lookup(["p"], V1))["p"].rewards == [1.0]  # nothing written
        digest = responses_digest(["a"])
        assert await store.write([write("p", ["a", "bb"])], [digest]) == [True]
        assert (await store.lookup(["p"], V1))["p"].rewards == [1.0, 2.0]

    with_store(body)


def test_delete_forgets_a_prompt(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        await store.write([write("p", ["a"])])
        await store.write([write("q", ["b"])])
        assert await store.delete("p")
        assert not await store.delete("p")
        assert list(await store.lookup(["p", "q"], V1)) == ["q"]
        assert await store.counts(V1) == (1, 1)

    with_store(body)


def test_counts_page_through_many_prompts(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        writes = [write(f"p{n}", ["a"]) for n in range(1203)]
        assert await store.write(writes[:3], ["", "", None]) == [True, True, True]
        assert all(await store.write(writes))
        assert await store.counts(V1) == (1203, 1203)
        assert await store.counts(V2) == (1203, 0)

    with_store(body)


# --- Redis only: what happens to the process around it ---------------------------------------


@pytest.fixture
def own_redis(tmp_path: Any) -> AsyncIterator[RedisProcess]:
    with RedisProcess(tmp_path / "redis", persistent=True) as server:
        yield server


def test_a_dead_redis_is_reported_quickly_then_reconnected(own_redis: RedisProcess) -> None:
    from service.baselines.store import StoreUnavailable

    metrics = NoMetrics()

    async def body() -> None:
        store = connect(Settings(redis_url=own_redis.url), metrics)
        await store.write([write("p", ["a"])])
        own_redis.kill()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.lookup(["p"], V1), timeout=5)
        own_redis.start()
        assert (await store.lookup(["p"], V1))["p"].rewards == [1.0]  # persisted, reconnected
        await store.aclose()

    asyncio.run(body())
    assert ("lookup", True) in metrics.ops
    assert ("lookup", False) in metrics.ops
