"""A TCP proxy between a Redis client and a real ``redis-server`` that injects faults at the
protocol level: it reads the client's RESP commands and, when an armed fault's command comes by,
holds every later reply of that connection (the client's socket timeout fires, although Redis
executed the command) or cuts the connection after forwarding it (Redis executed it, the client
saw the connection drop mid-pipeline).

It runs its own event loop in a thread on a free 127.0.0.1 port, so synchronous and asynchronous
tests alike can use it; ``fired`` counts the faults that happened, so a test can check that its
fault was really exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["hold", "cut"]
CHUNK = 65536


@dataclass
class Fault:
    """What to do to the connection that sends the ``count``-th command named ``command``."""

    kind: FaultKind
    command: bytes
    count: int = 1


class RedisFaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<upstream_port>``, faults on demand."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.fired = 0
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()  # the test thread arms what the proxy thread consumes
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="redis-fault-proxy")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_reply(self, command: bytes, count: int = 1) -> None:
        """The connection that sends the ``count``-th ``command`` from now gets no reply to it
        or to anything after it: Redis runs it, the client times out."""
        with self._lock:
            self._faults.append(Fault("hold", command.upper(), count))

    def cut_after(self, command: bytes, count: int = 1) -> None:
        """The connection that sends the ``count``-th ``command`` from now is closed once Redis
        has run the commands up to that one; the client gets none of their replies."""
        with self._lock:
            self._faults.append(Fault("cut", command.upper(), count))

    def pending(self) -> int:
        """Armed faults that have not fired yet."""
        with self._lock:
            return len(self._faults)

    def __enter__(self) -> RedisFaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # --- the proxy's own thread -----------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
        # Connections still open end here, on the running loop: left pending, they would be
        # destroyed with the closed loop and raise from the garbage collector in a later test.
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._forward(client_r, client_w)
        finally:
            self._connections.discard(task)

    async def _forward(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        state = _State()
        requests = asyncio.create_task(self._requests(client_r, upstream_w, state))
        replies = asyncio.create_task(_replies(upstream_r, client_w, state))
        try:
            await asyncio.wait({requests, replies}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the proxy stops and cancels this connection
            for task in (requests, replies):
                task.cancel()
            await asyncio.gather(requests, replies, return_exceptions=True)
            for writer in (client_w, upstream_w):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _requests(
        self, client_r: asyncio.StreamReader, upstream_w: asyncio.StreamWriter, state: _State
    ) -> None:
        """Client -> Redis, one command at a time; returns when the connection is to close."""
        buffer = bytearray()
        while data := await client_r.read(CHUNK):
            buffer += data
            for command in split_commands(buffer):
                fault = self._due(command_name(command))
                upstream_w.write(command)
                if fault is None:
                    continue
                state.held = True
                if fault.kind == "cut":
                    # The client must see nothing more, and Redis must have run what it got (a
                    # marker echoed back proves it) before the connection to it is closed.
                    state.marker = f"fault-proxy-{uuid.uuid4().hex}".encode()
                    upstream_w.write(
                        b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(state.marker), state.marker)
                    )
                    await upstream_w.drain()
                    await state.ran_through.wait()
                    return
            await upstream_w.drain()

    def _due(self, name: bytes) -> Fault | None:
        with self._lock:
            if not self._faults or self._faults[0].command != name:
                return None
            fault = self._faults[0]
            fault.count -= 1
            if fault.count > 0:
                return None
            self._faults.popleft()
            self.fired += 1
            return fault


@dataclass
class _State:
    """One proxied connection: whether its replies are held, and the marker of a cut."""

    held: bool = False
    marker: bytes | None = None
    ran_through: asyncio.Event = field(default_factory=asyncio.Event)


async def _replies(
    upstream_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, state: _State
) -> None:
    """Redis -> client, until a fault holds the replies (then they are read and dropped, and a
    cut's marker is looked for)."""
    seen = bytearray()
    try:
        while data := await upstream_r.read(CHUNK):
            if not state.held:
                client_w.write(data)
                await client_w.drain()
                continue
            seen += data
            if state.marker is not None and state.marker in seen:
                state.ran_through.set()
            del seen[: max(0, len(seen) - CHUNK)]
    finally:
        state.ran_through.set()


def command_name(command: bytes) -> bytes:
    """The upper-cased name of one RESP command (an array of bulk strings) or inline one."""
    if command.startswith(b"*"):
        parts = command.split(b"\r\n", 3)
        return parts[2].upper() if len(parts) > 2 else b""
    return command.split(None, 1)[0].upper() if command.strip() else b""


def split_commands(buffer: bytearray) -> list[bytes]:
    """Take every complete command off the front of ``buffer``."""
    commands = []
    while (end := _command_end(buffer)) is not None:
        commands.append(bytes(buffer[:end]))
        del buffer[:end]
    return commands


def _command_end(buffer: bytearray) -> int | None:
    """Where the first command of ``buffer`` ends, or None when it is not complete yet."""
    line_end = buffer.find(b"\r\n")
    if line_end < 0:
        return None
    if not buffer.startswith(b"*"):
        return line_end + 2  # an inline command
    position = line_end + 2
    for _ in range(int(buffer[1:line_end])):
        header_end = buffer.find(b"\r\n", position)
        if header_end < 0:
            return None
        length = int(buffer[position + 1 : header_end])
        position = header_end + 2 + length + 2
        if position > len(buffer):
            return None
    return position
