"""One behavioural suite, run on every baseline store: the in-process one, Redis (a real
``redis-server`` of the test session's own) and a Redis Cluster (three real masters of the
session's own, the suite's prompts spread over all three)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from redis.asyncio.cluster import RedisCluster

from service.baselines.memory import MemoryBaselineStore
from service.baselines.redis_store import connect
from service.baselines.store import BaselineStore, BaselineWrite, responses_digest
from service.settings import Settings
from tests.redis_cluster import RedisClusterProcess
from trainer_client.launch import RedisProcess

T = TypeVar("T")
V1, V2 = "rm@111111111111", "rm@222222222222"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]


class NoMetrics:
    def __init__(self) -> None:
        self.ops: list[tuple[str, bool]] = []

    def store_op(self, op: str, seconds: float, failed: bool) -> None:
        self.ops.append((op, failed))


class CountingMetrics(NoMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.corrupt: Counter[str] = Counter()

    def store_corrupt(self, reason: str) -> None:
        self.corrupt[reason] += 1


def write(
    pid: str,
    responses: list[str],
    version: str = V1,
    prompt: Any = "P",
    upload_id: str | None = None,
) -> BaselineWrite:
    rewards = [float(len(r)) for r in responses]
    return BaselineWrite(
        prompt_id=pid,
        prompt=prompt,
        responses=responses,
        version=version,
        rewards=rewards,
        upload_id=upload_id,
    )


async def statuses(
    store: BaselineStore, writes: list[BaselineWrite], expected: list[str | None] | None = None
) -> list[str]:
    return [outcome.status for outcome in await store.write(writes, expected or ())]


@pytest.fixture(params=["memory", "redis", "cluster"])
def with_store(
    request: pytest.FixtureRequest, redis_server: RedisProcess
) -> Callable[[Callable[[BaselineStore], Awaitable[T]]], T]:
    """Runs a test body against a fresh store of each kind, on its own event loop."""
    server = server_of(request, request.param, redis_server)

    def run(body: Callable[[BaselineStore], Awaitable[T]]) -> T:
        async def main() -> T:
            async with open_store(request.param, server) as store:
                return await body(store)

        return asyncio.run(main())

    return run


def server_of(
    request: pytest.FixtureRequest, kind: str, redis_server: RedisProcess
) -> RedisProcess | RedisClusterProcess:
    """The session's Redis, or its Redis Cluster (started only when a test asks for it)."""
    if kind == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        return cluster
    return redis_server


class open_store:  # noqa: N801 - an async context manager named like a function
    def __init__(
        self,
        kind: str,
        server: RedisProcess | RedisClusterProcess,
        metrics: NoMetrics | None = None,
    ) -> None:
        self.kind, self.server, self.metrics = kind, server, metrics or NoMetrics()

    async def __aenter__(self) -> BaselineStore:
        if self.kind == "memory":
            self.store: BaselineStore = MemoryBaselineStore()
        else:
            self.store = connect(Settings(redis_url=self.server.url), self.metrics)
            client = self.store._client
            if self.kind == "cluster":
                await client.flushdb(target_nodes=RedisCluster.PRIMARIES)
            else:
                await client.flushdb()
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
        assert await statuses(store, [write("p", ["a", "bb", "ccc"])]) == ["stored"]
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
        assert await statuses(store, [write("p", ["a"])], [""]) == ["stored"]  # absent: ok
        assert await statuses(store, [write("p", ["zz"])], [""]) == ["conflict"]  # now present
        assert await statuses(store, [write("p", ["zz"])], ["not-the-digest"]) == ["conflict"]
        assert (await store.lookup(["p"], V1))["p"].rewards == [1.0]  # nothing written
        digest = responses_digest(["a"])
        assert await statuses(store, [write("p", ["a", "bb"])], [digest]) == ["stored"]
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
        assert await statuses(store, writes[:3], ["", "", None]) == ["stored"] * 3
        assert all(outcome.written for outcome in await store.write(writes))
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


def test_a_conditional_write_with_an_applied_upload_id_is_a_duplicate(with_store: Any) -> None:
    async def body(store: BaselineStore) -> None:
        assert await statuses(store, [write("p", ["a"], upload_id="u1")], [""]) == ["stored"]
        digest = responses_digest(["a"])
        again = write("p", ["a", "a"], upload_id="u1")
        assert await statuses(store, [again], [digest]) == ["duplicate"]
        assert (await store.lookup(["p"], V1, with_responses=True))["p"].responses == ["a"]
        # A replace is applied whatever was recorded (it is idempotent anyway).
        assert await statuses(store, [write("p", ["b"], upload_id="u1")]) == ["stored"]
        # Forgetting the prompt forgets its upload ids: the same upload is stored again.
        assert await store.delete("p")
        assert await statuses(store, [write("p", ["a"], upload_id="u1")], [""]) == ["stored"]

    with_store(body)


def test_only_the_last_upload_ids_are_kept(with_store: Any) -> None:
    from service.baselines.store import UPLOADS_KEPT

    async def body(store: BaselineStore) -> None:
        ids = [f"u{n}" for n in range(UPLOADS_KEPT + 1)]
        assert all(
            o.written for o in await store.write([write("p", ["a"], upload_id=u) for u in ids])
        )
        digest = responses_digest(["a"])
        kept = write("p", ["a", "b"], upload_id=ids[-1])
        assert await statuses(store, [kept], [digest]) == ["duplicate"]
        forgotten = write("p", ["a", "b"], upload_id=ids[0])  # the oldest, dropped
        assert await statuses(store, [forgotten], [digest]) == ["stored"]

    with_store(body)


@pytest.fixture(params=["redis", "cluster"])
def redis_kind(
    request: pytest.FixtureRequest, redis_server: RedisProcess
) -> tuple[str, RedisProcess | RedisClusterProcess]:
    """A Redis store's kind (one Redis, or a cluster) and its server."""
    return request.param, server_of(request, request.param, redis_server)


def test_the_suites_prompts_spread_over_every_master(redis_cluster: RedisClusterProcess) -> None:
    from service.baselines.redis_store import responses_key

    masters = {redis_cluster.node_of(responses_key(f"p{n}")) for n in range(10)}
    assert masters == set(range(len(redis_cluster.nodes)))


def test_redis_bounds_each_prompts_upload_ids_in_size_and_time(
    redis_kind: tuple[str, RedisProcess | RedisClusterProcess],
) -> None:
    from service.baselines.redis_store import uploads_key
    from service.baselines.store import UPLOADS_KEPT, UPLOADS_TTL_S

    async def body() -> None:
        async with open_store(*redis_kind) as store:
            writes = [write("p", ["a"], upload_id=f"u{n}") for n in range(UPLOADS_KEPT + 5)]
            await store.write(writes)
            client = store._client  # type: ignore[attr-defined]
            assert await client.zcard(uploads_key("p")) == UPLOADS_KEPT
            assert 0 < await client.ttl(uploads_key("p")) <= UPLOADS_TTL_S

    asyncio.run(body())


def test_redis_values_crs_did_not_write_cost_only_their_prompt(
    redis_kind: tuple[str, RedisProcess | RedisClusterProcess],
) -> None:
    from service.baselines.redis_store import responses_key, rewards_key

    metrics = CountingMetrics()

    async def body() -> None:
        async with open_store(*redis_kind, metrics) as store:
            client = store._client  # type: ignore[attr-defined]
            await store.write([write("good", ["a"]), write("stale", ["b"])])
            await client.set(responses_key("typed"), "a string")
            await client.hset(
                responses_key("json"), mapping={"digest": "d", "prompt": "1", "responses": "{"}
            )
            await client.set(rewards_key("stale", V1), "[not json")
            found = await store.lookup(["good", "typed", "json", "stale"], V1)
            assert found["good"].rewards == [1.0]
            assert found["typed"].corrupt
            assert found["json"].corrupt
            assert found["stale"].rewards is None  # to be computed again
            assert found["stale"].responses == ["b"]
            outcomes = await store.write([write("typed", ["c"]), write("good", ["d"])])
            assert [o.status for o in outcomes] == ["corrupt", "stored"]
            assert await store.counts(V1) == (2, 1)  # good and stale: the others were not crs's

    asyncio.run(body())
    assert metrics.corrupt["wrong_type"] >= 2
    assert metrics.corrupt["bad_value"] >= 2
