"""Round trips to one Redis or to the nodes of a Redis Cluster, for the Redis baseline store.

A batch of prompts goes as one pipeline per node, the nodes at once. On one Redis a failure is
the whole store's, and raised. In a cluster a node that fails costs only the prompts of its
slots: they come back without replies, and the node is left alone for a cool-down (its prompts
answered at once meanwhile), so a dead node costs one request its timeouts, not every request.
After a node fails the topology is asked again (a replica may have taken its slots over), at
most every ``TOPOLOGY_REFRESH_S``, so its next try goes where its slots are now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.baselines.store import PartlyUnavailable, StoreUnavailable

log = logging.getLogger("crs.baselines.redis")

Client = Redis | RedisCluster
# What the client library raises (a cluster without a reachable node raises no RedisError).
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)
# Replies that say the node or the cluster failed for this command, not that its key is bad.
NODE_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    AskError,
    TryAgainError,
)
TOPOLOGY_REFRESH_S = 1.0
# Queues one item's commands on a pipeline; queues commands to send first to a node (a
# script's loading), and says how many replies they add.
Queue = Callable[[Any, int], Awaitable[None]]
Prelude = Callable[[Any, ClusterNode], int]


@dataclass(slots=True)
class Trip:
    """One pipelined round trip over the nodes: each item's replies, or None when its node
    failed (then ``error`` says how, the first failure)."""

    replies: list[list[Any] | None]
    error: str = ""

    @property
    def failed(self) -> list[int]:
        return [index for index, replies in enumerate(self.replies) if replies is None]


@dataclass(slots=True)
class NodeHealth:
    """Which cluster nodes failed a moment ago (shared by a store's clients)."""

    cooldown_s: float
    # Told the name (host:port) of each node that fails (the service's metrics).
    on_down: Callable[[str], None] | None = None
    down_until: dict[str, float] = field(default_factory=dict)

    def cooling(self, node: ClusterNode) -> bool:
        return time.monotonic() < self.down_until.get(node.name, 0.0)

    def check(self, node: ClusterNode | None) -> None:
        """Raise ``PartlyUnavailable`` for a node in its cool-down."""
        if node is not None and self.cooling(node):
            raise PartlyUnavailable(cooling_message(node))

    def down(self, node: ClusterNode, error: str) -> None:
        """Leave a failed node alone for a while: its prompts are unavailable at once."""
        self.down_until[node.name] = time.monotonic() + self.cooldown_s
        if self.on_down is not None:
            self.on_down(node.name)
        log.warning(
            "baseline store: Redis Cluster node %s failed (%s); its prompts are 'unavailable' "
            "for %.1f s",
            node.name,
            error,
            self.cooldown_s,
        )

    def failed(self, node: ClusterNode, op: str, exc: Exception) -> PartlyUnavailable:
        """What a cluster node's failed single command raises (and the node is left alone)."""
        self.down(node, described(exc))
        return PartlyUnavailable(f"redis {op} failed on node {node.name}: {described(exc)}")


class Nodes:
    """One client (of one Redis or of a cluster) and how the store uses it: round trips by
    node, the bound on operations at once, the topology asked again after a failure."""

    def __init__(
        self, client: Client, health: NodeHealth, *, max_operations: int, wait_s: float
    ) -> None:
        self.client = client
        self.health = health
        self.cluster = client if isinstance(client, RedisCluster) else None
        self._wait_s = wait_s
        # A cluster client fails rather than waits when a node's connections are all in use:
        # operations wait here instead (each uses at most one connection per node).
        self._operations = asyncio.Semaphore(max_operations)
        self._refreshed_at = 0.0

    async def trip(
        self,
        keys: Sequence[str],
        queue: Queue,
        per_item: int,
        attempts: int,
        *,
        prelude: Prelude | None = None,
    ) -> Trip:
        """Queue each item's ``per_item`` commands (``keys[i]`` routes item ``i``) and send
        them, one pipeline per node. A node that fails fails its items only (raised on one
        Redis: it is the whole store); a cluster node is tried ``attempts`` times, the topology
        asked again after each failure. Replies that say the node failed for one command fail
        its item."""
        trip = Trip([None] * len(keys))
        groups, uncovered = await self._groups(keys)

        async def run(node: ClusterNode | None, indices: list[int]) -> str:
            if node is not None and self.health.cooling(node):
                return cooling_message(node)
            error = ""
            for _ in range(attempts):
                try:
                    async with self.client.pipeline(transaction=False) as pipe:
                        skip = prelude(pipe, node) if prelude and node else 0
                        for index in indices:
                            await queue(pipe, index)
                        flat = await pipe.execute(raise_on_error=False)
                except REDIS_ERRORS as exc:
                    if node is None:
                        raise
                    error = described(exc)
                    await self._refresh()  # for the next try, or the next request
                    continue
                for n, index in enumerate(indices):
                    replies = flat[skip + n * per_item : skip + (n + 1) * per_item]
                    failure = next((r for r in replies if isinstance(r, NODE_ERRORS)), None)
                    if failure is None:
                        trip.replies[index] = replies
                    else:
                        error = error or described(failure)
                return error
            if node is not None:
                self.health.down(node, error)
            return error

        errors = await asyncio.gather(*(run(node, indices) for node, indices in groups))
        trip.error = next((error for error in (*errors, uncovered) if error), "")
        return trip

    async def _groups(
        self, keys: Sequence[str]
    ) -> tuple[list[tuple[ClusterNode | None, list[int]]], str]:
        """The items by the node of their key's slot (one group on one Redis); those of slots
        no node serves are left out, and said so."""
        if self.cluster is None:
            return [(None, list(range(len(keys))))], ""
        await self.cluster.initialize()
        groups: dict[str, tuple[ClusterNode | None, list[int]]] = {}
        uncovered = ""
        for index, key in enumerate(keys):
            node = _node_for(self.cluster, key)
            if node is None:
                uncovered = "SlotNotCoveredError: no Redis Cluster node serves the slot"
            else:
                groups.setdefault(node.name, (node, []))[1].append(index)
        return list(groups.values()), uncovered

    async def node_of(self, key: str) -> ClusterNode | None:
        """The cluster node of a key, checked not to be cooling down (None on one Redis)."""
        if self.cluster is None:
            return None
        await self.cluster.initialize()
        node = _node_for(self.cluster, key)
        if node is None:
            raise PartlyUnavailable(f"no Redis Cluster node serves the slot of {key}")
        self.health.check(node)
        return node

    async def primaries(self) -> list[ClusterNode]:
        """The cluster's primaries, in the order of the first slot each serves (a replica
        that takes a primary's slots over takes its place)."""
        assert self.cluster is not None
        await self.cluster.initialize()
        first: dict[str, tuple[int, ClusterNode]] = {}
        for slot, nodes in self.cluster.nodes_manager.slots_cache.items():
            if nodes and (nodes[0].name not in first or slot < first[nodes[0].name][0]):
                first[nodes[0].name] = (slot, nodes[0])
        return [node for _, node in sorted(first.values(), key=lambda entry: entry[0])]

    async def _refresh(self) -> None:
        """Ask the cluster's topology again, best effort: a replica may serve a failed
        primary's slots now."""
        now = time.monotonic()
        if self.cluster is None or now - self._refreshed_at < TOPOLOGY_REFRESH_S:
            return
        self._refreshed_at = now
        try:
            await self.cluster.nodes_manager.initialize()
        except REDIS_ERRORS as exc:
            log.info("baseline store: asking the Redis Cluster topology failed: %s", described(exc))

    def bounded(self) -> AbstractAsyncContextManager[None]:
        """Wait for one of the operations a cluster client may run at once (a bounded pool
        that makes callers wait, like one Redis's, up to the socket timeout)."""
        return nullcontext() if self.cluster is None else self._operation()

    @asynccontextmanager
    async def _operation(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._wait_s):
                await self._operations.acquire()
        except TimeoutError:
            raise StoreUnavailable("redis: no connection free in time") from None
        try:
            yield
        finally:
            self._operations.release()


def cooling_message(node: ClusterNode) -> str:
    return f"Redis Cluster node {node.name} failed a moment ago; not asked again yet"


def described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _node_for(client: RedisCluster, key: str) -> ClusterNode | None:
    try:
        return client.get_node_from_key(key)
    except SlotNotCoveredError:
        return None
