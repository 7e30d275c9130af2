"""The Redis baseline store, shared by every replica (DESIGN.md 5).

Keys, with the prompt id as hash tag so one prompt's keys share a cluster slot:

- ``crs:{<prompt_id>}:responses``: a hash of ``digest``, ``prompt`` (JSON) and ``responses``
  (a JSON list), model independent;
- ``crs:{<prompt_id>}:rewards:<model_version>``: ``{"digest": ..., "rewards": [...]}``, the
  rewards of the responses with that digest under that version;
- ``crs:{index}:prompts``: the set of stored prompt ids, for counts.

A lookup of a whole batch is one pipelined round trip (plus one more for prompts whose rewards
must be computed). Every operation is bounded by the client's socket timeouts and retry policy.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.baselines.store import (
    BaselineWrite,
    StoredPrompt,
    StoreKind,
    StoreUnavailable,
    responses_digest,
)
from service.settings import Settings

log = logging.getLogger("crs.baselines.redis")

PROMPTS_INDEX = "crs:{index}:prompts"
COUNT_CHUNK = 500

# Compare-and-set of one prompt: its responses and the writing version's rewards together.
# ARGV[1]: the digest expected now ("*": any, "": absent).
WRITE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'digest') or ''
if ARGV[1] ~= '*' and current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'digest', ARGV[2], 'prompt', ARGV[3], 'responses', ARGV[4])
redis.call('SET', KEYS[2], ARGV[5])
return 1
"""


def responses_key(prompt_id: str) -> str:
    return f"crs:{{{prompt_id}}}:responses"


def rewards_key(prompt_id: str, version: str) -> str:
    return f"crs:{{{prompt_id}}}:rewards:{version}"


class StoreObserver(Protocol):
    """Where the store reports each Redis operation (the service's metrics)."""

    def store_op(self, op: str, seconds: float, failed: bool) -> None: ...


def connect(settings: Settings, observer: StoreObserver) -> RedisBaselineStore:
    """A store on ``settings.redis_url``; connections open lazily, on first use."""
    if settings.redis_url is None:
        raise ValueError("no Redis URL")
    # A bounded pool that makes callers wait for a connection (up to the socket timeout)
    # rather than fail: a large upload writes many prompts at once.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_socket_timeout_s,
        decode_responses=True,
        socket_timeout=settings.redis_socket_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), settings.redis_retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=settings.redis_health_check_s,
    )
    client = Redis.from_pool(pool)
    return RedisBaselineStore(client, observer)


class RedisBaselineStore:
    """Implements ``BaselineStore`` on Redis."""

    def __init__(self, client: Redis, observer: StoreObserver) -> None:
        self._client = client
        self._observer = observer
        self._write = client.register_script(WRITE_SCRIPT)

    @property
    def kind(self) -> StoreKind:
        return "redis"

    async def lookup(
        self, prompt_ids: Sequence[str], version: str, *, with_responses: bool = False
    ) -> dict[str, StoredPrompt]:
        ids = list(dict.fromkeys(prompt_ids))
        if not ids:
            return {}
        async with self._op("lookup"):
            async with self._client.pipeline(transaction=False) as pipe:
                for prompt_id in ids:
                    pipe.hget(responses_key(prompt_id), "digest")
                    pipe.get(rewards_key(prompt_id, version))
                replies = await pipe.execute()
            stored = {
                prompt_id: (digest, _rewards_for(digest, cached))
                for prompt_id, digest, cached in zip(ids, replies[::2], replies[1::2], strict=True)
                if digest is not None
            }
            load = [
                pid for pid, (_, rewards) in stored.items() if with_responses or rewards is None
            ]
            texts = await self._responses(load)
        return {
            prompt_id: StoredPrompt(digest=digest, rewards=rewards, **texts.get(prompt_id, {}))
            for prompt_id, (digest, rewards) in stored.items()
        }

    async def _responses(self, prompt_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not prompt_ids:
            return {}
        async with self._client.pipeline(transaction=False) as pipe:
            for prompt_id in prompt_ids:
                pipe.hmget(responses_key(prompt_id), ["prompt", "responses"])
            replies = await pipe.execute()
        return {
            prompt_id: {"prompt": json.loads(prompt), "responses": json.loads(responses)}
            for prompt_id, (prompt, responses) in zip(prompt_ids, replies, strict=True)
            if prompt is not None and responses is not None  # deleted between the round trips
        }

    async def write(
        self, writes: Sequence[BaselineWrite], expected_digests: Sequence[str | None] = ()
    ) -> list[bool]:
        if not writes:
            return []
        expected = list(expected_digests) or [None] * len(writes)
        async with self._op("write"), self._client.pipeline(transaction=False) as pipe:
            for write, digest in zip(writes, expected, strict=True):
                keys, args = _write_call(write, digest)
                await self._write(keys=keys, args=args, client=pipe)
            pipe.sadd(PROMPTS_INDEX, *{write.prompt_id for write in writes})
            replies = await pipe.execute()
        return [bool(reply) for reply in replies[:-1]]

    async def cache_rewards(
        self, prompt_id: str, digest: str, version: str, rewards: Sequence[float]
    ) -> None:
        async with self._op("cache"):
            await self._client.set(rewards_key(prompt_id, version), _rewards_doc(digest, rewards))

    async def delete(self, prompt_id: str) -> bool:
        # Rewards keys stay: they name the digest they score, so they are never used for other
        # responses, and are right again if the same responses come back.
        async with self._op("delete"), self._client.pipeline(transaction=False) as pipe:
            pipe.delete(responses_key(prompt_id))
            pipe.srem(PROMPTS_INDEX, prompt_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def counts(self, version: str) -> tuple[int, int]:
        prompts = scored = 0
        async with self._op("counts"):
            chunk: list[str] = []
            async for prompt_id in self._client.sscan_iter(PROMPTS_INDEX, count=COUNT_CHUNK):
                chunk.append(prompt_id)
                if len(chunk) == COUNT_CHUNK:
                    prompts, scored = _add(prompts, scored, await self._scored(chunk, version))
                    chunk = []
            prompts, scored = _add(prompts, scored, await self._scored(chunk, version))
        return prompts, scored

    async def _scored(self, prompt_ids: list[str], version: str) -> tuple[int, int]:
        """Of these indexed prompts: how many are stored, and scored under ``version``."""
        if not prompt_ids:
            return 0, 0
        async with self._client.pipeline(transaction=False) as pipe:
            for prompt_id in prompt_ids:
                pipe.hget(responses_key(prompt_id), "digest")
                pipe.get(rewards_key(prompt_id, version))
            replies = await pipe.execute()
        digests = [(d, c) for d, c in zip(replies[::2], replies[1::2], strict=True) if d]
        return len(digests), sum(_rewards_for(d, c) is not None for d, c in digests)

    async def ping(self) -> None:
        async with self._op("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def _op(self, op: str) -> AsyncIterator[None]:
        """Times one operation, and turns any Redis failure into ``StoreUnavailable``."""
        started = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis {op} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._observer.store_op(op, time.perf_counter() - started, failed)


def _write_call(write: BaselineWrite, expected_digest: str | None) -> tuple[list[str], list[str]]:
    """Keys and arguments of ``WRITE_SCRIPT`` for one prompt."""
    digest = responses_digest(write.responses)
    args = [
        "*" if expected_digest is None else expected_digest,
        digest,
        json.dumps(write.prompt, ensure_ascii=False),
        json.dumps(write.responses, ensure_ascii=False),
        _rewards_doc(digest, write.rewards),
    ]
    return [responses_key(write.prompt_id), rewards_key(write.prompt_id, write.version)], args


def _rewards_doc(digest: str, rewards: Sequence[float]) -> str:
    return json.dumps({"digest": digest, "rewards": list(rewards)})


def _rewards_for(digest: str | None, cached: str | None) -> list[float] | None:
    """The cached rewards if they score the responses of ``digest``."""
    if digest is None or cached is None:
        return None
    doc = json.loads(cached)
    if doc.get("digest") != digest:
        return None
    return [float(reward) for reward in doc["rewards"]]


def _add(prompts: int, scored: int, more: tuple[int, int]) -> tuple[int, int]:
    return prompts + more[0], scored + more[1]
