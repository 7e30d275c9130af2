"""A minimal asyncio HTTP/1.1 keep-alive client and a closed-loop load generator.

On a small CPU the load generator shares cores with the server it measures, so it must cost next
to nothing per request: every request is serialised once before the clock starts, each concurrent
client owns one keep-alive connection, and a response is parsed only as far as its status line,
its length and its JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_ERRORS_KEPT = 5


@dataclass(frozen=True, slots=True)
class Response:
    """Status and raw body of one answer."""

    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def post_bytes(host: str, port: int, path: str, payload: Any) -> bytes:
    """A complete ``POST`` with a JSON body, ready to be written to a connection."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class Connection:
    """One keep-alive HTTP/1.1 connection; it reconnects when the server has closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(self, raw: bytes) -> Response:
        """Send one serialised request and read its response; the connection stays open."""
        await self.connect()
        reader, writer = self._reader, self._writer
        assert reader is not None
        assert writer is not None
        try:
            writer.write(raw)
            await writer.drain()
            response, keep_alive = await read_response(reader)
        except BaseException:
            # A half-read response leaves the stream out of step: never reuse it.
            await self.close()
            raise
        if not keep_alive:
            await self.close()
        return response


async def read_response(reader: asyncio.StreamReader) -> tuple[Response, bool]:
    """One response from the stream, and whether the connection may be reused."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    keep_alive = headers.get("connection") != "close"
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = await read_chunked(reader)
    else:
        body, keep_alive = await reader.read(), False
    return Response(status, body), keep_alive


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
    # Trailers (none expected) end with an empty line.
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass
    return b"".join(chunks)


@dataclass(kw_only=True)
class LoadResult:
    """What one closed-loop run saw."""

    seconds: float = 0.0
    requests: int = 0
    items: int = 0
    tokens: int = 0
    failures: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)

    def record(self, response: Response, expected_items: int) -> None:
        """Count a response: a 200 with one result per item, or a failure."""
        if response.status != 200:
            self.fail(f"HTTP {response.status}: {response.body[:200]!r}")
            return
        results = response.json()["results"]
        if len(results) != expected_items:
            self.fail(f"{len(results)} results for {expected_items} items")
            return
        self.items += expected_items
        self.tokens += sum(int(result.get("tokens", 0)) for result in results)


async def run_closed_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    expected_items: Sequence[int],
    *,
    concurrency: int,
    timeout_s: float,
) -> LoadResult:
    """Send every request once from ``concurrency`` clients that share one work queue.

    Each client sends its next request as soon as the previous one is answered (a closed loop,
    like PPO workers waiting for their rewards). Connections open before the clock starts.
    """
    connections = [Connection(host, port) for _ in range(max(1, min(concurrency, len(requests))))]
    await asyncio.gather(*(connection.connect() for connection in connections))
    result = LoadResult()
    # One iterator shared by all clients: each request index goes to exactly one of them.
    queue = iter(range(len(requests)))
    start = time.perf_counter()
    try:
        await asyncio.gather(
            *(
                client(connection, queue, requests, expected_items, result, timeout_s)
                for connection in connections
            )
        )
        result.seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
    return result


async def client(
    connection: Connection,
    queue: Iterator[int],
    requests: Sequence[bytes],
    expected_items: Sequence[int],
    result: LoadResult,
    timeout_s: float,
) -> None:
    for index in queue:
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                response = await connection.request(requests[index])
        except (OSError, EOFError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            # IncompleteReadError is an EOFError; a malformed status line a ValueError.
            result.fail(f"request {index}: {type(exc).__name__}: {exc}")
            continue
        result.latencies_s.append(time.perf_counter() - sent)
        result.requests += 1
        result.record(response, expected_items[index])


async def post_once(host: str, port: int, raw: bytes, timeout_s: float = 60.0) -> Response:
    """One request on a fresh connection (for checks, not for load)."""
    connection = Connection(host, port)
    try:
        async with asyncio.timeout(timeout_s):
            return await connection.request(raw)
    finally:
        await connection.close()
