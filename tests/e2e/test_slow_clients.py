"""Slow, stalled and too many connections against a real `crs-service` (loopback only).

Intended behaviour: headers must arrive within `CRS_HEADER_TIMEOUT_S` (else 408 and close) and
fit `CRS_MAX_HEADER_BYTES` (else 431); a body within `CRS_BODY_TIMEOUT_S` (else 408 and close).
Beyond `CRS_MAX_CONNECTIONS`, the longest-idle connection (no request in the app) is closed to
make room, so a legitimate request is served; when every connection holds a request in the app,
a newcomer gets 503 with `Retry-After`. The descriptor soft limit is raised at start.
"""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trainer_client.launch import ServiceProcess, free_port

# Long enough that a test would hang (and fail on its guard) if the bound did not hold.
GUARD_S = 30.0
PARTIAL_HEADERS = b"POST /v1/rewards HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: applic"
JSON = {"Content-Type": "application/json"}
BODY = json.dumps({"items": [{"prompt": "hi", "response": "hello"}]}).encode()


@pytest.fixture(scope="module")
def quick_timeouts(tiny_llama: Path) -> Iterator[ServiceProcess]:
    env = {"CRS_HEADER_TIMEOUT_S": "1", "CRS_BODY_TIMEOUT_S": "1"}
    with ServiceProcess(tiny_llama, env=env) as server:
        server.wait_ready()
        yield server


@pytest.fixture
def capped(tiny_llama: Path) -> Iterator[ServiceProcess]:
    """20 connections at most; timeouts far away, so only the cap can close a connection."""
    env = {
        "CRS_MAX_CONNECTIONS": "20",
        "CRS_HEADER_TIMEOUT_S": "600",
        "CRS_BODY_TIMEOUT_S": "600",
        "CRS_KEEP_ALIVE_S": "600",
    }
    with ServiceProcess(tiny_llama, env=env) as server:
        server.wait_ready()
        yield server


def connect(server: ServiceProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S)
    sock.settimeout(GUARD_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the guard expires)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(body)


def test_half_sent_headers_get_408_and_the_connection_closes(
    quick_timeouts: ServiceProcess,
) -> None:
    with connect(quick_timeouts) as sock:
        sock.sendall(PARTIAL_HEADERS)
        status, headers, body = parse_response(read_until_closed(sock))
    assert status == 408
    assert headers["connection"] == "close"
    assert body["error"]["type"] == "request_timeout"
    assert "headers" in body["error"]["message"]


def test_a_silent_connection_is_closed_too(quick_timeouts: ServiceProcess) -> None:
    with connect(quick_timeouts) as sock:
        status, _, body = parse_response(read_until_closed(sock))
    assert (status, body["error"]["type"]) == (408, "request_timeout")


def test_stalled_body_gets_408_and_the_connection_closes(quick_timeouts: ServiceProcess) -> None:
    head = (
        b"POST /v1/rewards HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY)
    )
    with connect(quick_timeouts) as sock:
        sock.sendall(head + BODY[:10])
        status, headers, body = parse_response(read_until_closed(sock))
    assert status == 408
    assert headers["connection"] == "close"
    assert body["error"]["type"] == "request_timeout"
    assert "body" in body["error"]["message"]
    # The slot is free again: the next request is served.
    response = httpx.post(f"{quick_timeouts.url}/v1/rewards", content=BODY, headers=JSON)
    assert response.status_code == 200


def test_oversized_headers_get_431(quick_timeouts: ServiceProcess) -> None:
    with connect(quick_timeouts) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000)
        status, _, body = parse_response(read_until_closed(sock))
    assert (status, body["error"]["type"]) == (431, "headers_too_large")


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed ``sock`` (read gives EOF or a reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_half_open_connections_beyond_the_cap_make_room_for_a_real_request(
    capped: ServiceProcess,
) -> None:
    stalled = [connect(capped) for _ in range(60)]
    try:
        for sock in stalled:
            sock.sendall(PARTIAL_HEADERS)
        # Accepted after all 60 (one listener, accepted in order): the cap has been enforced
        # for each of them by the time this request is answered.
        response = httpx.post(f"{capped.url}/v1/rewards", content=BODY, headers=JSON)
        assert response.status_code == 200
        ready, _, _ = select.select(stalled, [], [], GUARD_S)
        assert ready, "no stalled connection was closed"
        closed = sum(closed_by_server(sock) for sock in stalled)
        assert closed >= len(stalled) - 20
    finally:
        for sock in stalled:
            sock.close()
    # And the server recovers: a burst of ordinary requests is served.
    with httpx.Client(base_url=capped.url) as client:
        statuses = {client.post("/v1/rewards", content=BODY, headers=JSON).status_code}
    assert statuses == {200}


def test_every_connection_busy_gives_a_503_envelope_then_recovers(
    capped: ServiceProcess,
) -> None:
    head = (
        b"POST /v1/rewards HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    )
    busy = [connect(capped) for _ in range(20)]
    try:
        for sock in busy:
            sock.sendall(head)
        # uvicorn answers 100 Continue when the app starts reading the body: each request is
        # then inside the app, waiting for a body that does not come.
        for sock in busy:
            assert sock.recv(65536).startswith(b"HTTP/1.1 100")
        response = httpx.get(f"{capped.url}/livez")
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"]["type"] == "not_ready"
        assert "connections" in response.json()["error"]["message"]
    finally:
        for sock in busy:
            sock.close()
    deadline = time.monotonic() + GUARD_S
    status = 0
    while status != 200 and time.monotonic() < deadline:
        # The server learns of the closed connections asynchronously.
        with contextlib.suppress(httpx.TransportError):
            status = httpx.get(f"{capped.url}/livez").status_code
    assert status == 200


def lower_descriptor_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))


def test_descriptor_soft_limit_is_raised_at_start(tiny_llama: Path, tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip(f"the hard descriptor limit ({hard}) leaves nothing to raise")
    port = free_port()
    command = [sys.executable, "-m", "service", "serve", "--model", str(tiny_llama)]
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lower_descriptor_limit,
        )
    try:
        logged = ""
        deadline = time.monotonic() + 120
        # The limit is set (and logged) before the settings line.
        while "settings:" not in logged and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            logged = log_path.read_text()
            time.sleep(0.05)
        assert "descriptor limit raised from 512 to" in logged
        soft = Path(f"/proc/{process.pid}/limits").read_text()
        open_files = next(line for line in soft.splitlines() if line.startswith("Max open files"))
        assert int(open_files.split()[3]) > 512
    finally:
        process.terminate()
        process.wait(timeout=60)
