"""A reverse proxy for client tests: a real uvicorn server in a thread that forwards to a crs
server, answers injected faults in the error envelope instead, and records every request."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from trainer_client.launch import free_port

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ERROR_TYPES = {422: "validation_error", 429: "overloaded", 503: "not_ready", 504: "timeout"}
# Hop-by-hop and length headers: the proxy sends its own.
DROPPED_HEADERS = {b"host", b"content-length", b"transfer-encoding", b"connection"}


@dataclass(frozen=True)
class Fault:
    """An answer the proxy gives instead of forwarding; with ``forward_first``, after
    forwarding (the request took effect upstream, its answer is lost on the way back)."""

    status: int
    retry_after: str | None = None
    forward_first: bool = False

    def answer(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        error_type = ERROR_TYPES.get(self.status, "error")
        body = httpx.Response(
            self.status,
            json={"error": {"type": error_type, "message": "injected", "details": None}},
        ).content
        headers = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            headers.append((b"retry-after", self.retry_after.encode()))
        return self.status, headers, body


@dataclass(frozen=True)
class Seen:
    """One request the proxy received, and how it answered."""

    at: float
    method: str
    path: str
    status: int


class FaultProxy:
    """Forwards to ``upstream`` (switchable at any time) unless a fault is due.

    ``inject(status, n)`` answers the next ``n`` requests with ``status``; ``always`` answers
    every request with it. ``seen`` lists requests in arrival order, ``max_in_flight`` the
    most handled at once.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.always: Fault | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[Seen] = []
        self.max_in_flight = 0
        self._faults: deque[Fault] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()  # the test thread reads what the server thread writes
        config = uvicorn.Config(
            self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def inject(
        self,
        status: int,
        count: int = 1,
        retry_after: str | None = None,
        *,
        forward_first: bool = False,
    ) -> None:
        with self._lock:
            self._faults.extend([Fault(status, retry_after, forward_first)] * count)

    def paths(self, path: str) -> list[Seen]:
        """The requests seen for ``path``."""
        with self._lock:
            return [seen for seen in self.seen if seen.path == path]

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self._faults.clear()
            self.always = None
            self.max_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        arrived = time.monotonic()
        body = await read_body(receive)
        with self._lock:
            fault = self._faults.popleft() if self._faults else self.always
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if fault is None or fault.forward_first:
                status, headers, content = await self._forward(scope, body)
            if fault is not None:
                status, headers, content = fault.answer()
        finally:
            with self._lock:
                self._in_flight -= 1
                self.seen.append(Seen(arrived, scope["method"], scope["path"], status))
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _forward(
        self, scope: Scope, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        url = self.upstream + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in DROPPED_HEADERS]
        # A client per request: the proxy sees few requests, and nothing outlives the test.
        async with httpx.AsyncClient(timeout=120.0) as client:
            answer = await client.request(scope["method"], url, content=body, headers=headers)
        kept = [(k, v) for k, v in answer.headers.raw if k.lower() not in DROPPED_HEADERS]
        return answer.status_code, kept, answer.content

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the fault proxy did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)
