"""The Redis baseline store, shared by every replica (DESIGN.md 5): one Redis, or a Redis
Cluster (``redis+cluster://host:port,host:port...``).

Keys, with the prompt id as hash tag so one prompt's keys share a cluster slot:

- ``crs:{<prompt_id>}:responses``: a hash of ``digest``, ``prompt`` (JSON) and ``responses``
  (a JSON list), model independent;
- ``crs:{<prompt_id>}:rewards:<model_version>``: ``{"digest": ..., "rewards": [...]}``, the
  rewards of the responses with that digest under that version;
- ``crs:{<prompt_id>}:uploads``: a sorted set of the upload ids applied to the prompt (score:
  when, in ms), the last ``UPLOADS_KEPT`` of the last ``UPLOADS_TTL_S``;
- ``crs:{index}:prompts`` (one Redis only): the set of stored prompt ids, for counts and the
  rebaseline pass. A cluster has no index: it would sit in a slot of its own, and a write would
  touch two slots. Counts and the pass scan each primary for the responses hashes instead.

A write of one prompt is one script on the prompt's slot: the digest check, the upload-id
check, the responses, the rewards, the upload id (and the index entry) together, so a prompt is
stored wholly or not at all. Each prompt's reply is read on its own: one prompt's error (out of
memory, a key crs did not write) never fails the others. After a write whose reply was lost (a
timeout, a cut connection), the store re-reads whether it landed before answering, and sends
again only what did not: with upload ids that is exact.

A lookup of a whole batch is one pipelined round trip per node (plus one more for prompts whose
rewards must be computed). Values crs did not write (wrong key type, unreadable JSON) cost only
their own prompt: treated as missing, logged once per key, counted. Every operation is bounded
by the client's socket timeouts and retry policy. In a cluster, a node that fails costs only
the prompts of its slots, and is left alone for ``CRS_STORE_COOLDOWN_S`` (its prompts answered
unavailable at once meanwhile), so a dead node costs one request a timeout, not every request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, runtime_checkable

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.baselines.redis_nodes import (
    REDIS_ERRORS,
    Client,
    NodeHealth,
    Nodes,
    Trip,
    described,
)
from service.baselines.store import (
    CONFLICT,
    DUPLICATE,
    STORED,
    UPLOADS_KEPT,
    UPLOADS_TTL_S,
    BaselineWrite,
    PartlyUnavailable,
    StoredPrompt,
    StoreFull,
    StoreKind,
    StoreUnavailable,
    WriteOutcome,
    responses_digest,
)
from service.settings import ClusterAddress, Settings, cluster_address

log = logging.getLogger("crs.baselines.redis")
# A round trip's failures: the client's, or no connection free in time.
STORE_ERRORS: tuple[type[Exception], ...] = (*REDIS_ERRORS, StoreUnavailable)

PROMPTS_INDEX = "crs:{index}:prompts"
RESPONSES_PATTERN = "crs:{*}:responses"
COUNT_CHUNK = 500
OUT_OF_MEMORY = (
    "Redis is out of memory (used memory above its maxmemory, and its policy evicts nothing): "
    "free memory or raise maxmemory; retrying does not help until then"
)
# Keys logged as corrupt, so a bad key asked for at every request is logged once (bounded).
CORRUPT_LOGGED_MAX = 10_000
DIGEST = re.compile(r"[0-9a-f]{32}")

# One prompt, atomically. KEYS: responses, rewards, uploads[, index: one Redis only].
# ARGV[1]: the digest expected now ("*": any, "": absent); ARGV[6]: the upload id ("": none).
# Every check comes before the first write: a script is not rolled back, and Redis refuses its
# first write (only) under OOM. Returns {1, ""} written, {2, ""} upload id applied already
# (nothing written, under a digest condition only), {0, current digest} conflict, {3, key} a key
# of a type crs never writes.
WRITE_SCRIPT = """
local function foreign(key, kind)
  local found = redis.call('TYPE', key)['ok']
  return found ~= 'none' and found ~= kind
end
if foreign(KEYS[1], 'hash') then return {3, KEYS[1]} end
if foreign(KEYS[3], 'zset') then return {3, KEYS[3]} end
if KEYS[4] and foreign(KEYS[4], 'set') then return {3, KEYS[4]} end
local current = redis.call('HGET', KEYS[1], 'digest') or ''
if ARGV[1] ~= '*' and current ~= ARGV[1] then return {0, current} end
local upload = ARGV[6]
if upload ~= '' and ARGV[1] ~= '*' and redis.call('ZSCORE', KEYS[3], upload) then
  return {2, ''}
end
redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'prompt', ARGV[3], 'responses', ARGV[4])
redis.call('SET', KEYS[2], ARGV[5])
if KEYS[4] then redis.call('SADD', KEYS[4], ARGV[10]) end
if upload ~= '' then
  local now = tonumber(ARGV[7])
  local ttl = tonumber(ARGV[9])
  redis.call('ZADD', KEYS[3], now, upload)
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[8]) - 1)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return {1, ''}
"""


def responses_key(prompt_id: str) -> str:
    return f"crs:{{{prompt_id}}}:responses"


def rewards_key(prompt_id: str, version: str) -> str:
    return f"crs:{{{prompt_id}}}:rewards:{version}"


def uploads_key(prompt_id: str) -> str:
    return f"crs:{{{prompt_id}}}:uploads"


def prompt_of(key: str) -> str:
    """The prompt id of a ``crs:{<prompt_id>}:responses`` key."""
    return key[len("crs:{") : -len("}:responses")]


class StoreObserver(Protocol):
    """Where the store reports each Redis operation (the service's metrics)."""

    def store_op(self, op: str, seconds: float, failed: bool) -> None: ...


@runtime_checkable
class CorruptionObserver(Protocol):
    """An observer that also counts values crs did not write (the service's metrics)."""

    def store_corrupt(self, reason: str) -> None: ...


@runtime_checkable
class NodeFailureObserver(Protocol):
    """An observer that also counts Redis Cluster node failures (the service's metrics)."""

    def store_node_failed(self, node: str) -> None: ...


def connect(settings: Settings, observer: StoreObserver) -> RedisBaselineStore:
    """A store on ``settings.redis_url`` (one Redis, or a Redis Cluster for a
    ``redis+cluster://`` URL); connections open lazily, on first use."""
    if settings.redis_url is None:
        raise ValueError("no Redis URL")
    address = cluster_address(settings.redis_url)
    if address is not None:
        return RedisBaselineStore(
            _cluster(address, settings),
            observer,
            writer=_cluster(address, settings),
            retries=settings.redis_retries,
            node_cooldown_s=settings.store_cooldown_s,
            max_connections=settings.redis_max_connections,
            wait_s=settings.redis_socket_timeout_s,
        )
    client = Redis.from_pool(_pool(settings.redis_url, settings, settings.redis_retries))
    # Writes are never sent again blindly by the client library (a reply lost after the write
    # landed would apply it twice): the store re-reads what landed and sends the rest itself.
    writer = Redis.from_pool(_pool(settings.redis_url, settings, 0))
    return RedisBaselineStore(client, observer, writer=writer, retries=settings.redis_retries)


def _pool(url: str, settings: Settings, retries: int) -> BlockingConnectionPool:
    # A bounded pool that makes callers wait for a connection (up to the socket timeout)
    # rather than fail: a large upload writes many prompts at once.
    backoff = ExponentialBackoff(cap=0.2, base=0.01) if retries else NoBackoff()
    return BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_socket_timeout_s,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        retry=Retry(backoff, retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=settings.redis_health_check_s,
    )


def _cluster(address: ClusterAddress, settings: Settings) -> RedisCluster:
    """The cluster client. The library's own retries are off: on a connection error they close
    every node's connections and wait; the store retries the failed node itself, after asking
    the topology again (a replica may have taken its slots over). One connection per node
    more than the store's own bound, for that topology request."""
    return RedisCluster.from_url(
        address.node_url,
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes[1:]],
        max_connections=settings.redis_max_connections + 1,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        health_check_interval=settings.redis_health_check_s,
        retry=Retry(NoBackoff(), 0),
        # A node that is gone costs its own slots; the others serve theirs.
        require_full_coverage=False,
    )


class RedisBaselineStore:
    """Implements ``BaselineStore`` on one Redis or a Redis Cluster."""

    def __init__(
        self,
        client: Client,
        observer: StoreObserver,
        *,
        writer: Client | None = None,
        retries: int = 1,
        node_cooldown_s: float = 1.0,
        max_connections: int = 32,
        wait_s: float = 0.5,
    ) -> None:
        self._client = client
        self._writer = writer or client
        self._observer = observer
        self._attempts = 1 + retries
        self._write = self._writer.register_script(WRITE_SCRIPT)
        self._corrupt_logged: set[str] = set()
        health = NodeHealth(
            node_cooldown_s,
            observer.store_node_failed if isinstance(observer, NodeFailureObserver) else None,
        )
        self._reads = Nodes(client, health, max_operations=max_connections, wait_s=wait_s)
        self._writes = Nodes(self._writer, health, max_operations=max_connections, wait_s=wait_s)
        self._cluster = self._reads.cluster
        # One Redis keeps an index of the prompts; a cluster scans for them.
        self._index = PROMPTS_INDEX if self._cluster is None else None

    @property
    def kind(self) -> StoreKind:
        return "redis"

    @property
    def cluster(self) -> bool:
        """Whether the store is a Redis Cluster."""
        return self._cluster is not None

    async def lookup(
        self,
        prompt_ids: Sequence[str],
        version: str,
        *,
        with_responses: bool = False,
        partial: bool = False,
    ) -> dict[str, StoredPrompt]:
        ids = list(dict.fromkeys(prompt_ids))
        if not ids:
            return {}
        found: dict[str, StoredPrompt] = {}
        async with self._op("lookup"):

            async def queue(pipe: Any, index: int) -> None:
                pipe.hget(responses_key(ids[index]), "digest")
                pipe.get(rewards_key(ids[index], version))

            trip = await self._reads.trip(_keys(ids), queue, 2, self._attempts)
            self._fail_unless_partial(trip, "lookup", partial)
            stored: dict[str, tuple[str, list[float] | None]] = {}
            for prompt_id, replies in zip(ids, trip.replies, strict=True):
                if replies is None:
                    found[prompt_id] = StoredPrompt(digest="", rewards=None, unavailable=True)
                    continue
                digest, cached = replies
                if isinstance(digest, ResponseError):
                    self._corrupt(responses_key(prompt_id), digest)
                    found[prompt_id] = StoredPrompt(digest="", rewards=None, corrupt=True)
                elif digest is not None:
                    key = rewards_key(prompt_id, version)
                    stored[prompt_id] = (digest, self._rewards_for(key, digest, cached))
            load = [
                pid for pid, (_, rewards) in stored.items() if with_responses or rewards is None
            ]
            texts = await self._responses(load, partial)
        for prompt_id, (digest, rewards) in stored.items():
            text = texts.get(prompt_id, {})
            if text is UNAVAILABLE:
                found[prompt_id] = StoredPrompt(digest=digest, rewards=None, unavailable=True)
            elif text is CORRUPT:
                found[prompt_id] = StoredPrompt(digest=digest, rewards=None, corrupt=True)
            elif prompt_id not in load or text:  # else deleted between the round trips
                found[prompt_id] = StoredPrompt(digest=digest, rewards=rewards, **text)
        return found

    async def _responses(self, prompt_ids: list[str], partial: bool) -> dict[str, dict[str, Any]]:
        """The prompt and responses of each; ``CORRUPT`` for an unreadable one,
        ``UNAVAILABLE`` when its node failed, absent when it was deleted meanwhile."""
        if not prompt_ids:
            return {}

        async def queue(pipe: Any, index: int) -> None:
            pipe.hmget(responses_key(prompt_ids[index]), ["prompt", "responses"])

        trip = await self._reads.trip(_keys(prompt_ids), queue, 1, self._attempts)
        self._fail_unless_partial(trip, "lookup", partial)
        texts: dict[str, dict[str, Any]] = {}
        for prompt_id, replies in zip(prompt_ids, trip.replies, strict=True):
            if replies is None:
                texts[prompt_id] = UNAVAILABLE
                continue
            [reply] = replies
            if isinstance(reply, ResponseError):
                self._corrupt(responses_key(prompt_id), reply)
                texts[prompt_id] = CORRUPT
            elif reply[0] is not None and reply[1] is not None:
                text = _texts(reply[0], reply[1])
                if text is CORRUPT:
                    self._corrupt(responses_key(prompt_id), "unreadable prompt or responses")
                texts[prompt_id] = text
        return texts

    def _fail_unless_partial(self, trip: Trip, op: str, partial: bool) -> None:
        """Raise for failed nodes: always for one Redis (the whole store failed), unless a
        partial answer was asked for in a cluster."""
        if not trip.failed:
            return
        message = f"redis {op} failed: {trip.error}"
        if self._cluster is None:
            raise StoreUnavailable(message)
        if not partial:
            raise PartlyUnavailable(message)

    async def write(
        self, writes: Sequence[BaselineWrite], expected_digests: Sequence[str | None] = ()
    ) -> list[WriteOutcome]:
        if not writes:
            return []
        expected = list(expected_digests) or [None] * len(writes)
        now_ms = int(time.time() * 1000)
        calls = [self._write_call(w, e, now_ms) for w, e in zip(writes, expected, strict=True)]
        outcomes: dict[int, WriteOutcome] = {}
        pending, unknown, error = list(range(len(writes))), [], ""
        started = time.perf_counter()
        for _ in range(self._attempts):
            replies, error = await self._send(
                [writes[i] for i in pending], [calls[i] for i in pending]
            )
            unsure = []
            for index, reply in zip(pending, replies, strict=True):
                if (outcome := self._write_outcome(writes[index], reply)) is None:
                    unsure.append(index)
                else:
                    outcomes[index] = outcome
            pending = []
            if not unsure:
                break
            landed = await self._landed([writes[i] for i in unsure])
            for index, outcome in zip(unsure, landed, strict=True):
                if outcome is UNREAD:  # not even a re-read: say nothing was stored
                    unknown.append(index)
                elif outcome is None:
                    pending.append(index)
                else:
                    outcomes[index] = outcome
            if not pending:
                break
        for index in pending + unknown:
            outcomes[index] = WriteOutcome("unavailable", f"redis write failed: {error}")
        self._observer.store_op("write", time.perf_counter() - started, bool(pending + unknown))
        return [outcomes[index] for index in range(len(writes))]

    def _write_call(
        self, write: BaselineWrite, expected_digest: str | None, now_ms: int
    ) -> tuple[list[str], list[str]]:
        """Keys and arguments of ``WRITE_SCRIPT`` for one prompt: all in its slot, and the
        index as well on one Redis."""
        keys, args = _write_call(write, expected_digest, now_ms)
        return (keys + [self._index] if self._index else keys), args

    async def _send(
        self, writes: list[BaselineWrite], calls: list[tuple[list[str], list[str]]]
    ) -> tuple[list[Any], str]:
        """One pipelined round trip of write scripts per node: each reply (an error reply as
        its exception), or None when its node's connection failed (it may or may not have
        landed)."""

        async def queue(pipe: Any, index: int) -> None:
            keys, args = calls[index]
            if self._cluster is not None:
                # The cluster pipeline neither loads scripts (the prelude does, per node) nor
                # offers ``evalsha`` (it cannot know that the keys share a slot: ours do, and
                # the client checks that they do before sending).
                pipe.execute_command("EVALSHA", self._write.sha, len(keys), *keys, *args)
            else:
                await self._write(keys=keys, args=args, client=pipe)

        keys = _keys([write.prompt_id for write in writes])
        try:
            async with self._writes.bounded():
                trip = await self._writes.trip(keys, queue, 1, 1, prelude=_load_script)
        except STORE_ERRORS as exc:
            return [None] * len(calls), described(exc)
        return [None if r is None else r[0] for r in trip.replies], trip.error

    def _write_outcome(self, write: BaselineWrite, reply: Any) -> WriteOutcome | None:
        """The outcome of one script reply; None when it is not known (the reply was lost, or
        Redis forgot the script since it was loaded: nothing ran)."""
        if reply is None or isinstance(reply, NoScriptError):
            return None
        if isinstance(reply, OutOfMemoryError) or (
            isinstance(reply, ResponseError) and str(reply).startswith("OOM")
        ):
            return WriteOutcome("full", OUT_OF_MEMORY)
        if isinstance(reply, ResponseError):
            if "WRONGTYPE" in str(reply):
                return self._corrupt_write(responses_key(write.prompt_id), "wrong key type")
            return WriteOutcome("unavailable", f"redis write failed: {type(reply).__name__}")
        code, info = int(reply[0]), reply[1]
        if code == 3:
            return self._corrupt_write(str(info), "wrong key type")
        return {1: STORED, 2: DUPLICATE}.get(code, CONFLICT)

    def _corrupt_write(self, key: str, reason: str) -> WriteOutcome:
        self._corrupt(key, reason)
        return WriteOutcome(
            "corrupt",
            f"corrupt entry: {key} holds a value crs did not write; delete the prompt "
            "(DELETE /v1/baselines/{prompt_id}) and upload it again",
        )

    async def _landed(self, writes: list[BaselineWrite]) -> list[WriteOutcome | None]:
        """After lost replies, whether each write is in Redis now: "stored" when its
        responses are the prompt's, "duplicate" when only its upload id is recorded (applied,
        then changed by others, or applied by an earlier try), None when it did not land,
        ``UNREAD`` when its node does not answer."""

        async def queue(pipe: Any, index: int) -> None:
            pipe.hget(responses_key(writes[index].prompt_id), "digest")
            pipe.zscore(uploads_key(writes[index].prompt_id), writes[index].upload_id or "")

        try:
            async with self._reads.bounded():
                keys = _keys([write.prompt_id for write in writes])
                trip = await self._reads.trip(keys, queue, 2, self._attempts)
        except STORE_ERRORS:
            return [UNREAD] * len(writes)
        landed: list[WriteOutcome | None] = []
        for write, replies in zip(writes, trip.replies, strict=True):
            if replies is None:
                landed.append(UNREAD)
                continue
            digest, seen = replies
            recorded = write.upload_id is not None and isinstance(seen, float)
            if digest == responses_digest(write.responses) and (recorded or not write.upload_id):
                landed.append(STORED)
            else:
                landed.append(DUPLICATE if recorded else None)
        return landed

    async def cache_rewards(
        self, prompt_id: str, digest: str, version: str, rewards: Sequence[float]
    ) -> None:
        async with self._op("cache"):
            node = await self._reads.node_of(responses_key(prompt_id))
            try:
                await self._client.set(
                    rewards_key(prompt_id, version), _rewards_doc(digest, rewards)
                )
            except REDIS_ERRORS as exc:
                if node is None:
                    raise  # one Redis: ``_op`` says the store failed
                raise self._reads.health.failed(node, "cache", exc) from exc

    async def delete(self, prompt_id: str) -> bool:
        # Rewards keys stay: they name the digest they score, so they are never used for other
        # responses, and are right again if the same responses come back. The upload ids go:
        # an upload sent again after a delete is stored again.
        async with self._op("delete"):
            node = await self._reads.node_of(responses_key(prompt_id))
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.delete(responses_key(prompt_id))
                    pipe.delete(uploads_key(prompt_id))
                    if self._index:
                        pipe.srem(self._index, prompt_id)
                    deleted, *_ = await pipe.execute()
            except REDIS_ERRORS as exc:
                if node is None:
                    raise  # one Redis: ``_op`` says the store failed
                raise self._reads.health.failed(node, "delete", exc) from exc
        return bool(deleted)

    async def counts(self, version: str) -> tuple[int, int]:
        prompts = scored = 0
        async with self._op("counts"):
            chunk: list[str] = []
            async for prompt_id in self._all_prompt_ids():
                chunk.append(prompt_id)
                if len(chunk) == COUNT_CHUNK:
                    prompts, scored = _add(prompts, scored, await self._scored(chunk, version))
                    chunk = []
            prompts, scored = _add(prompts, scored, await self._scored(chunk, version))
        return prompts, scored

    async def _all_prompt_ids(self) -> AsyncIterator[str]:
        """Every stored prompt id (an id may come twice while prompts are written)."""
        cursor = ""
        while True:
            cursor, ids = await self._page(cursor, COUNT_CHUNK)
            for prompt_id in ids:
                yield prompt_id
            if not cursor:
                return

    async def prompt_ids(self, cursor: str, count: int) -> tuple[str, list[str]]:
        async with self._op("scan"):
            return await self._page(cursor, count)

    async def _page(self, cursor: str, count: int) -> tuple[str, list[str]]:
        """SSCAN of the index, or in a cluster SCAN of one primary after another: stateless
        on the server (the cursor is all there is), so a page can be asked again after a
        failure, and prompts may change meanwhile."""
        if self._index is not None:
            following, ids = await self._client.sscan(
                self._index, cursor=int(cursor or 0), count=count
            )
            page = [pid if isinstance(pid, str) else pid.decode() for pid in ids]
            return ("" if int(following) == 0 else str(following)), page
        return await self._cluster_page(cursor, count)

    async def _cluster_page(self, cursor: str, count: int) -> tuple[str, list[str]]:
        """One SCAN page of one primary. The cursor is ``<primary>/<its name>/<its cursor>``,
        primaries in the order of the slots they serve (a replica that takes over a primary's
        slots takes its place); a cursor whose primary changed meanwhile starts that primary's
        scan again (ids may come twice, none is missed)."""
        cluster = self._cluster
        assert cluster is not None
        primaries = await self._reads.primaries()
        number, name, scan = 0, "", 0
        if cursor:
            try:
                first, _, rest = cursor.partition("/")
                name, _, last = rest.rpartition("/")
                number, scan = int(first), int(last)
            except ValueError:
                raise ValueError(f"not a prompt cursor of this store: {cursor!r}") from None
        if number >= len(primaries):
            return "", []
        node = primaries[number]
        if name and node.name != name:
            scan = 0
        self._reads.health.check(node)
        try:
            reply = await cluster.execute_command(
                "SCAN",
                scan,
                "MATCH",
                RESPONSES_PATTERN,
                "COUNT",
                count,
                "TYPE",
                "hash",
                target_nodes=node,
            )
        except REDIS_ERRORS as exc:
            raise self._reads.health.failed(node, "scan", exc) from exc
        following, keys = _scan_reply(reply)
        page = [prompt_of(key) for key in keys]
        if following:
            return f"{number}/{node.name}/{following}", page
        if number + 1 < len(primaries):
            return f"{number + 1}/{primaries[number + 1].name}/0", page
        return "", page

    async def _scored(self, prompt_ids: list[str], version: str) -> tuple[int, int]:
        """Of these prompts: how many are stored, and scored under ``version``."""
        if not prompt_ids:
            return 0, 0

        async def queue(pipe: Any, index: int) -> None:
            pipe.hget(responses_key(prompt_ids[index]), "digest")
            pipe.get(rewards_key(prompt_ids[index], version))

        trip = await self._reads.trip(_keys(prompt_ids), queue, 2, self._attempts)
        self._fail_unless_partial(trip, "counts", False)
        prompts = scored = 0
        for prompt_id, replies in zip(prompt_ids, trip.replies, strict=True):
            assert replies is not None
            digest, cached = replies
            if isinstance(digest, ResponseError) or (digest and not DIGEST.fullmatch(digest)):
                self._corrupt(responses_key(prompt_id), digest)
            elif digest:
                prompts += 1
                key = rewards_key(prompt_id, version)
                scored += self._rewards_for(key, digest, cached) is not None
        return prompts, scored

    async def ping(self) -> None:
        async with self._op("ping"):
            if not isinstance(self._client, RedisCluster):
                await self._client.ping()
                return
            await self._client.initialize()
            nodes = await self._reads.primaries()
            answers = await asyncio.gather(
                *(self._client.ping(target_nodes=node) for node in nodes), return_exceptions=True
            )
            down = [n.name for n, a in zip(nodes, answers, strict=True) if isinstance(a, Exception)]
            if len(down) == len(nodes):
                raise StoreUnavailable(f"no Redis Cluster primary answers: {', '.join(down)}")
            if down:
                raise PartlyUnavailable(f"Redis Cluster primaries down: {', '.join(down)}")

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._writer is not self._client:
            await self._writer.aclose()

    @asynccontextmanager
    async def _op(self, op: str) -> AsyncIterator[None]:
        """Times one operation, and turns any Redis failure into ``StoreUnavailable``."""
        started = time.perf_counter()
        failed = True
        try:
            async with self._reads.bounded():
                yield
            failed = False
        except OutOfMemoryError as exc:
            raise StoreFull(OUT_OF_MEMORY) from exc
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"redis {op} failed: {described(exc)}") from exc
        finally:
            self._observer.store_op(op, time.perf_counter() - started, failed)

    def _rewards_for(self, key: str, digest: str, cached: Any) -> list[float] | None:
        """The cached rewards if they score the responses of ``digest``; an unreadable value
        is reported and not used (computing them again overwrites it)."""
        if cached is None:
            return None
        rewards = _rewards_doc_for(digest, cached)
        if rewards is CORRUPT_REWARDS:
            self._corrupt(key, cached if isinstance(cached, ResponseError) else "unreadable JSON")
            return None
        return rewards

    def _corrupt(self, key: str, reason: object) -> None:
        """Count a value crs did not write; log it once per key (its name, never its value)."""
        kind = "wrong_type" if "WRONGTYPE" in str(reason) or "type" in str(reason) else "bad_value"
        if isinstance(self._observer, CorruptionObserver):
            self._observer.store_corrupt(kind)
        if key in self._corrupt_logged or len(self._corrupt_logged) >= CORRUPT_LOGGED_MAX:
            return
        self._corrupt_logged.add(key)
        log.warning(
            "baseline store: key %s holds a value crs did not write (%s); it is treated as "
            "absent, and costs only its own prompt, until it is deleted or replaced",
            key,
            kind.replace("_", " "),
        )


def _load_script(pipe: Any, node: ClusterNode) -> int:
    """Queue the write script's loading on a cluster node first (a node restarted or new
    since has forgotten it); how many replies that adds."""
    pipe.execute_command("SCRIPT LOAD", WRITE_SCRIPT, target_nodes=node)
    return 1


def _keys(prompt_ids: Sequence[str]) -> list[str]:
    """What routes each prompt to its node: all its keys share the slot of this one."""
    return [responses_key(prompt_id) for prompt_id in prompt_ids]


def _scan_reply(reply: Any) -> tuple[int, list[str]]:
    """The next cursor and the keys of a SCAN of one node (the cluster client answers
    ``{node: (cursor, keys)}`` or ``(cursor, keys)``, as its version does)."""
    if isinstance(reply, dict):
        [reply] = reply.values()
    following, keys = reply
    if isinstance(following, dict):
        [following] = following.values()
    return int(following), [k if isinstance(k, str) else k.decode() for k in keys]


# Markers of unreadable values and of failed nodes (compared by identity).
CORRUPT: dict[str, Any] = {}
UNAVAILABLE: dict[str, Any] = {}
CORRUPT_REWARDS: list[float] = []
UNREAD = WriteOutcome("unavailable", "the node did not answer the re-read")


def _texts(prompt: str, responses: str) -> dict[str, Any]:
    """The stored prompt and responses, or ``CORRUPT`` unless both are what crs writes."""
    try:
        prompt_value, responses_value = json.loads(prompt), json.loads(responses)
    except ValueError:
        return CORRUPT
    if not (isinstance(responses_value, list) and all(isinstance(r, str) for r in responses_value)):
        return CORRUPT
    if not (isinstance(prompt_value, str) or _is_messages(prompt_value)):
        return CORRUPT
    return {"prompt": prompt_value, "responses": responses_value}


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and all(isinstance(v, str) for v in m.values()) for m in value
    )


def _write_call(
    write: BaselineWrite, expected_digest: str | None, now_ms: int
) -> tuple[list[str], list[str]]:
    """Keys (those of the prompt's slot) and arguments of ``WRITE_SCRIPT`` for one prompt."""
    digest = responses_digest(write.responses)
    args = [
        "*" if expected_digest is None else expected_digest,
        digest,
        json.dumps(write.prompt, ensure_ascii=False),
        json.dumps(write.responses, ensure_ascii=False),
        _rewards_doc(digest, write.rewards),
        write.upload_id or "",
        str(now_ms),
        str(UPLOADS_KEPT),
        str(UPLOADS_TTL_S * 1000),
        write.prompt_id,
    ]
    keys = [
        responses_key(write.prompt_id),
        rewards_key(write.prompt_id, write.version),
        uploads_key(write.prompt_id),
    ]
    return keys, args


def _rewards_doc(digest: str, rewards: Sequence[float]) -> str:
    return json.dumps({"digest": digest, "rewards": list(rewards)})


def _rewards_doc_for(digest: str, cached: Any) -> list[float] | None:
    """The rewards of a cached document if it scores ``digest``; ``CORRUPT_REWARDS`` when it
    is not a document crs writes."""
    if isinstance(cached, ResponseError):
        return CORRUPT_REWARDS
    try:
        doc = json.loads(cached)
        if not isinstance(doc, dict):
            return CORRUPT_REWARDS
        if doc.get("digest") != digest:
            return None
        rewards = [float(reward) for reward in doc["rewards"]]
    except (ValueError, TypeError, KeyError):
        return CORRUPT_REWARDS
    return rewards


def _add(prompts: int, scored: int, more: tuple[int, int]) -> tuple[int, int]:
    return prompts + more[0], scored + more[1]
