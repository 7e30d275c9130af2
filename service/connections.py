"""Bounds on connections that uvicorn leaves open: slow headers, huge headers, too many sockets.

uvicorn times out idle keep-alive connections but not a request whose headers never finish,
and it caps concurrency only with a plain-text 503. ``GuardedHttpToolsProtocol`` is its
httptools protocol with three additions, each answered in the error envelope:

- request headers must be complete ``header_timeout_s`` after the connection opens (or after
  the first byte of the next request on a kept-alive one), else 408 and the connection closes;
- they may not exceed ``max_header_bytes``, else 431 and the connection closes;
- beyond ``max_connections`` open connections, the one that has waited longest without a
  request in progress (idle, or still sending its headers) is closed to make room; when every
  connection has a request in progress, the newcomer's request gets 503 with ``Retry-After``.

A request body is bounded by the route (``read_json``'s ``CRS_BODY_TIMEOUT_S``), where the
envelope and the request's own metrics are at hand.
"""

from __future__ import annotations

import asyncio
import json
import logging
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.api.errors import envelope

log = logging.getLogger("crs.connections")

# Log an eviction the first time and then every this many, so a flood does not flood the log.
EVICTION_LOG_EVERY = 1000


@dataclass(kw_only=True)
class ConnectionLimits:
    """The bounds of one server's connections, and how often they were enforced."""

    header_timeout_s: float
    max_header_bytes: int
    max_connections: int
    evicted: int = 0
    refused: int = 0


def error_bytes(status: int, error_type: str, message: str, extra: list[bytes]) -> bytes:
    """A whole HTTP/1.1 response carrying the envelope, after which the connection closes."""
    body = json.dumps(envelope(error_type, message)).encode()
    head = [
        STATUS_LINE[status],
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode() + b"\r\n",
        b"connection: close\r\n",
        *extra,
        b"\r\n",
    ]
    return b"".join(head) + body


async def over_capacity(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request on a connection beyond the cap while every other one is busy."""
    body = json.dumps(
        envelope("not_ready", "too many open connections; retry shortly or on another replica")
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size and a connection cap.

    Use ``bind(limits)`` for a class carrying a server's limits (uvicorn builds protocols from a
    class and its own arguments)."""

    limits: ClassVar[ConnectionLimits]

    @classmethod
    def bind(cls, limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
        """A subclass of this protocol enforcing ``limits``."""
        return type("BoundGuardedHttpToolsProtocol", (cls,), {"limits": limits})

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timer: TimerHandle | None = None
        self.awaiting_headers = True
        self.header_bytes = 0
        self.waiting_since = self.loop.time()

    # Connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm_header_timer()
        self.enforce_connection_cap()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.awaiting_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: a chunk that completes small headers may carry a big body.
        if self.awaiting_headers and self.header_bytes > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self.refuse(431, "headers_too_large", f"request headers exceed {limit} bytes")

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.awaiting_headers = True
        self.arm_header_timer()

    def on_headers_complete(self) -> None:
        # Reset here, not at the next message's first byte: that byte can come in the middle
        # of a chunk already counted.
        self.awaiting_headers = False
        self.header_bytes = 0
        self.disarm_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()
        super().on_response_complete()

    # The header deadline
    def arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(
                self.limits.header_timeout_s, self.headers_timed_out
            )

    def disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_timed_out(self) -> None:
        self.header_timer = None
        if not self.awaiting_headers or self.transport.is_closing():
            return
        if not self.is_idle():
            # A pipelined request stalled behind one in progress: close after that answer.
            self.cycle.keep_alive = False
            return
        timeout = self.limits.header_timeout_s
        self.refuse(408, "request_timeout", f"request headers not received within {timeout:g} s")

    def refuse(self, status: int, error_type: str, message: str) -> None:
        """Answer ``status`` in the envelope without involving the app, and close."""
        if self.transport.is_closing():
            return
        defaults = [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        self.transport.write(error_bytes(status, error_type, message, defaults))
        self.transport.close()

    # The connection cap
    def is_idle(self) -> bool:
        """No request of this connection is in the app or queued behind one."""
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def enforce_connection_cap(self) -> None:
        open_connections = [
            connection
            for connection in self.connections
            if isinstance(connection, GuardedHttpToolsProtocol)
            and not connection.transport.is_closing()
        ]
        if len(open_connections) <= self.limits.max_connections:
            return
        idle = [c for c in open_connections if c is not self and c.is_idle()]
        if idle:
            self.evict(min(idle, key=lambda connection: connection.waiting_since))
            return
        # Every connection is busy with a request: answer this one's request with a 503.
        self.limits.refused += 1
        self.app = over_capacity

    def evict(self, connection: GuardedHttpToolsProtocol) -> None:
        limits = self.limits
        limits.evicted += 1
        if limits.evicted % EVICTION_LOG_EVERY == 1:
            log.warning(
                "over %d open connections: closed the longest idle one (%d closed so far)",
                limits.max_connections,
                limits.evicted,
            )
        connection.disarm_header_timer()
        connection.transport.close()
