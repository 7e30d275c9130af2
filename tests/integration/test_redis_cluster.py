"""A Redis Cluster as the baseline store (three real masters): its URL, where prompts live, the
write of one prompt in one slot, and a master killed and started again. The behavioural suite
of test_baseline_stores.py runs on the cluster as well."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError
from redis import Redis
from redis.crc import key_slot

from service.baselines.redis_store import (
    PROMPTS_INDEX,
    RedisBaselineStore,
    _write_call,
    connect,
    responses_key,
)
from service.baselines.service import BaselineService
from service.baselines.store import PartlyUnavailable
from service.metrics import Metrics
from service.settings import Settings, cluster_address, redact_url
from tests.integration.test_baseline_stores import V1, V2, NoMetrics, write
from tests.redis_cluster import RedisClusterProcess, spread_ids
from tests.unit.test_rebaseline import LengthLease

SECRET = "Sekr1t-pw"

# --- the URL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "nodes", "node_url"),
    [
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
            (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
            "redis://10.0.0.1:7000",
        ),
        (
            f"rediss+cluster://crs:{SECRET}@a.internal:6379, b.internal:6380/0?ssl_cert_reqs=none",
            (("a.internal", 6379), ("b.internal", 6380)),
            f"rediss://crs:{SECRET}@a.internal:6379?ssl_cert_reqs=none",
        ),
        ("redis+cluster://[::1]:7000", (("::1", 7000),), "redis://[::1]:7000"),
    ],
)
def test_a_cluster_url_names_its_startup_nodes(
    url: str, nodes: tuple[tuple[str, int], ...], node_url: str
) -> None:
    address = cluster_address(url)
    assert address is not None
    assert address.nodes == nodes
    assert address.node_url == node_url
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:1", "unix:///r.sock"])
def test_a_single_node_url_is_no_cluster(url: str) -> None:
    assert cluster_address(url) is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"redis+cluster://crs:{SECRET}@a:7000,b", "node 2 of 2"),
        (f"redis+cluster://crs:{SECRET}@a:port", "node 1 of 1"),
        ("redis+cluster://", "node 1 of 1"),
        (f"redis+cluster://:{SECRET}@a:7000/2", "database 0 only"),
        (f"redis+cluster://:{SECRET}@[::1", "unreadable"),
        (f"redis://:{SECRET}@a:7000,b:7001/0", "names one node"),
    ],
)
def test_a_malformed_cluster_url_is_refused_clearly_and_without_its_password(
    url: str, says: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(redis_url=url)
    message = str(refused.value)
    assert says in message
    assert "redis+cluster://[user:password@]host:port" in message or "database" in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"redis+cluster://crs:{SECRET}@a:7000,b:7001/0",
            "redis+cluster://***@a:7000,b:7001/0",
        ),
        (
            f"rediss+cluster://a:7000,b:7001?password={SECRET}",
            "rediss+cluster://a:7000,b:7001?password=***",
        ),
        ("redis+cluster://a:7000,[::1]:7001", "redis+cluster://a:7000,[::1]:7001"),
    ],
)
def test_a_cluster_urls_credentials_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    logged = Settings(redis_url=url).for_log()
    assert logged["redis_url"] == shown
    assert SECRET not in str(logged)


# --- a healthy cluster ---------------------------------------------------------------------


def run(body: Callable[[RedisBaselineStore], Awaitable[Any]], url: str, **settings: Any) -> Any:
    async def main() -> Any:
        store = connect(Settings(redis_url=url, **settings), NoMetrics())
        try:
            await store._client.flushdb(target_nodes=store._client.PRIMARIES)  # type: ignore[union-attr]
            return await body(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


def keys_on(cluster: RedisClusterProcess, index: int, pattern: str) -> set[str]:
    """The keys that master ``index`` holds itself."""
    with Redis(port=cluster.nodes[index].port, decode_responses=True) as node:
        return set(node.scan_iter(match=pattern, count=1000))


def test_prompts_are_stored_on_the_master_of_their_slot(
    redis_cluster: RedisClusterProcess,
) -> None:
    ids = spread_ids(redis_cluster, "spread-", 4)

    async def body(store: RedisBaselineStore) -> None:
        assert all(o.status == "stored" for o in await store.write([write(p, ["a"]) for p in ids]))
        found = await store.lookup(ids, V1)
        assert {pid: stored.rewards for pid, stored in found.items()} == dict.fromkeys(ids, [1.0])

    run(body, redis_cluster.url)
    for index in range(len(redis_cluster.nodes)):
        expected = {
            responses_key(p) for p in ids if redis_cluster.node_of(responses_key(p)) == index
        }
        assert len(expected) == 4
        assert keys_on(redis_cluster, index, "crs:{spread-*}:responses") == expected


def stats(cluster: RedisClusterProcess, index: int, section: str) -> str:
    return cluster.nodes[index].command("info", section)


def test_the_write_of_one_prompt_is_one_script_in_its_own_slot(
    redis_cluster: RedisClusterProcess,
) -> None:
    ids = spread_ids(redis_cluster, "slot-", 2)
    for node in redis_cluster.nodes:
        node.command("config", "resetstat")

    async def body(store: RedisBaselineStore) -> None:
        writes = [write(p, ["a", "b"], upload_id=f"u-{p}") for p in ids]
        outcomes = await store.write(writes, [""] * len(writes))  # conditional: every check runs
        assert [o.status for o in outcomes] == ["stored"] * len(ids)
        assert all(
            len({key_slot(k.encode()) for k in store._write_call(w, "", 0)[0]}) == 1 for w in writes
        )

    run(body, redis_cluster.url)
    for index in range(len(redis_cluster.nodes)):
        commands = stats(redis_cluster, index, "commandstats")
        assert "cmdstat_evalsha:calls=2," in commands  # one script per prompt
        assert "cmdstat_sadd" not in commands  # no index
        assert "CROSSSLOT" not in stats(redis_cluster, index, "errorstats")
        assert keys_on(redis_cluster, index, PROMPTS_INDEX) == set()


def test_a_write_of_keys_in_two_slots_is_refused_before_it_is_sent(
    redis_cluster: RedisClusterProcess,
) -> None:
    """What the index would cost in a cluster: the client refuses such a script call (it
    must, for a write to stay atomic), so the store's own keys must share one slot."""
    keys, args = _write_call(write("p0", ["a"]), None, 0)

    async def body(store: RedisBaselineStore) -> Any:
        async with store._writer.pipeline() as pipe:
            pipe.execute_command("EVALSHA", store._write.sha, 4, *keys, PROMPTS_INDEX, *args)
            return await pipe.execute(raise_on_error=False)

    with pytest.raises(Exception, match="same key slot|CROSSSLOT"):
        run(body, redis_cluster.url)


def test_counts_pages_and_deletes_cover_every_master(redis_cluster: RedisClusterProcess) -> None:
    ids = spread_ids(redis_cluster, "page-", 5)

    async def body(store: RedisBaselineStore) -> None:
        await store.write([write(p, ["a"]) for p in ids])
        await store.cache_rewards(
            ids[0], (await store.lookup([ids[0]], V2))[ids[0]].digest, V2, [3.0]
        )
        assert await store.counts(V1) == (len(ids), len(ids))
        assert await store.counts(V2) == (len(ids), 1)
        cursor, seen, pages = "", [], 0
        while True:
            cursor, page = await store.prompt_ids(cursor, 2)
            seen += page
            pages += 1
            if not cursor:
                break
        assert sorted(set(seen)) == sorted(ids)
        assert pages > len(redis_cluster.nodes)  # paged, each master in turn
        for pid in ids[:3]:  # one on each master
            assert await store.delete(pid)
            assert not await store.delete(pid)
        assert await store.counts(V1) == (len(ids) - 3, len(ids) - 3)
        assert sorted(await store.lookup(ids, V1)) == sorted(ids[3:])

    run(body, redis_cluster.url)


# --- a master lost -------------------------------------------------------------------------

DEAD = 1
COOLDOWN_S = 2.0
DEADLINE_S = 30.0


def sources(baselines: dict[str, Any], ids: list[str]) -> dict[str, str]:
    return {pid: baselines[pid].source for pid in ids}


def test_a_killed_master_costs_only_its_own_prompts(
    own_redis_cluster: RedisClusterProcess, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = own_redis_cluster
    ids = spread_ids(cluster, "k-", 3)
    dead = [p for p in ids if cluster.node_of(responses_key(p)) == DEAD]
    live = [p for p in ids if p not in dead]
    fresh = spread_ids(cluster, "new-", 2)
    fresh_dead = [p for p in fresh if cluster.node_of(responses_key(p)) == DEAD]
    settings = Settings(redis_url=cluster.url, store_cooldown_s=COOLDOWN_S)
    metrics = Metrics()
    prompts = dict.fromkeys(ids, "P")
    expected = {pid: "unavailable" if pid in dead else "cache" for pid in ids}

    async def body() -> None:
        store = connect(settings, metrics)
        service = BaselineService(store, settings, metrics)
        try:
            assert all(o.written for o in await store.write([write(p, ["a"]) for p in ids]))
            cluster.kill(DEAD)
            with caplog.at_level(logging.WARNING, logger="crs.baselines.redis"):
                first = await service.resolve(prompts, LengthLease(version=V1))
                again = await service.resolve(prompts, LengthLease(version=V1))
            assert sources(first, ids) == expected
            assert sources(again, ids) == expected  # the live masters were not left alone
            assert [b.rewards for p, b in first.items() if p in live] == [[1.0]] * len(live)
            assert metrics.store_skipped._value.get() == 0
            # The dead master was asked once in the cool-down, not at every request.
            assert len([r for r in caplog.records if "failed (" in r.getMessage()]) == 1
            failures = {
                sample.labels["node"]: sample.value
                for sample in metrics.store_node_failures.collect()[0].samples
                if sample.name.endswith("_total")
            }
            assert failures == {cluster.nodes[DEAD].address: 1.0}
            # A version that never scored them: the live ones are computed and cached.
            computed = await service.resolve(prompts, LengthLease(version=V2))
            assert {p: b.source for p, b in computed.items() if p in live} == dict.fromkeys(
                live, "computed"
            )
            assert all(s.rewards for s in (await store.lookup(live, V2)).values())
            outcomes = await store.write([write(p, ["b"]) for p in fresh])
            assert {p: o.status for p, o in zip(fresh, outcomes, strict=True)} == {
                p: "unavailable" if p in fresh_dead else "stored" for p in fresh
            }
            with pytest.raises(PartlyUnavailable):
                await store.lookup(ids, V1)  # not partial: the caller asked for all or none
            cluster.restart(DEAD)
            await back_again(store, dead)
            assert all(o.written for o in await store.write([write(p, ["a"]) for p in dead]))
            final = await service.resolve(prompts, LengthLease(version=V1))
            assert sources(final, ids) == dict.fromkeys(ids, "cache")
        finally:
            await store.aclose()

    asyncio.run(body())


async def back_again(store: RedisBaselineStore, ids: list[str]) -> None:
    """Until the restarted master answers (after its cool-down): it is empty, so its prompts
    are absent, no longer unavailable."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = await store.lookup(ids, V1, partial=True)
        if not found:
            return
        assert all(stored.unavailable for stored in found.values())
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the restarted master's prompts still unavailable after {DEADLINE_S} s")


def test_a_rebaseline_pass_goes_through_every_master(redis_cluster: RedisClusterProcess) -> None:
    from service.baselines.rebaseline import RebaselineProgress, rebaseline

    ids = spread_ids(redis_cluster, "rebase-", 7)

    async def body(store: RedisBaselineStore) -> RebaselineProgress:
        await store.write([write(p, ["a", "bb"]) for p in ids])
        progress = await rebaseline(
            store, LengthLease(version=V2), RebaselineProgress(), prompts_per_batch=4
        )
        found = await store.lookup(ids, V2)
        assert all(stored.rewards is not None for stored in found.values())
        assert sorted(found) == sorted(ids)
        return progress

    progress = run(body, redis_cluster.url)
    assert (progress.state, progress.error) == ("done", None)
    assert (progress.prompts_total, progress.prompts_done) == (len(ids), len(ids))
    assert progress.prompts_failed == 0
