"""A real Redis Cluster for tests: three ``redis-server --cluster-enabled yes`` masters on
loopback, joined by ``redis-cli --cluster create``; a master can be killed (SIGKILL) and started
again on its port, with its cluster identity (its nodes.conf) and without its data."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from trainer_client.launch import free_port

MASTERS = 3
# Short, so that the others see a killed master as failed soon; a lost master costs only its
# slots (the default stops the whole cluster when any slot has no master).
NODE_TIMEOUT_MS = 1000
STARTUP_S = 30.0


class ClusterNodeProcess:
    """One master of the test cluster."""

    def __init__(self, binary: str, workdir: Path, password: str | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        # Its own: by default the bus listens on port + 10000, which may be taken (or too high).
        self.bus_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.workdir), "--save", "", "--appendonly", "no"]
        command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        command += ["--cluster-port", str(self.bus_port)]
        command += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        command += ["--cluster-require-full-coverage", "no"]
        if self.password is not None:
            command += ["--requirepass", self.password, "--masterauth", self.password]
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """SIGKILL: what a crashed node looks like to its clients."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def command(self, *args: str, timeout_s: float = 2.0) -> str:
        """One ``redis-cli`` command to this node alone; its output."""
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *self.auth(), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return done.stdout

    def auth(self) -> list[str]:
        """redis-cli's arguments for the password, if any."""
        return [] if self.password is None else ["-a", self.password, "--no-auth-warning"]

    def accepting(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
        ):
            # An unknown command answers an error, with or without a password: it is up.
            sock.sendall(b"CRS-HELLO\r\n")
            return sock.recv(16).startswith(b"-")
        return False

    def log_tail(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


class RedisClusterProcess:
    """Three masters, no replicas, every slot assigned; ``url`` is what the service takes."""

    def __init__(self, workdir: Path, masters: int = MASTERS, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are needed (apt-get install redis)")
        self.password = password
        self.nodes = [
            ClusterNodeProcess(binary, workdir / f"node-{n}", password) for n in range(masters)
        ]

    @property
    def url(self) -> str:
        credentials = "" if self.password is None else f":{self.password}@"
        return f"redis+cluster://{credentials}" + ",".join(node.address for node in self.nodes)

    def start(self) -> RedisClusterProcess:
        for node in self.nodes:
            node.start()
        self._wait(lambda: all(node.accepting() for node in self.nodes), "accepting")
        addresses = [node.address for node in self.nodes]
        created = subprocess.run(
            ["redis-cli", *self.nodes[0].auth(), "--cluster", "create", *addresses]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=STARTUP_S,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        self.wait_ok()
        return self

    def wait_ok(self) -> None:
        """Until every node says the cluster is ok and knows every other node as a master
        that is connected and not failed (a restarted node is seen again)."""
        self._wait(lambda: all(self._sees_all(node) for node in self.nodes), "cluster_state:ok")

    def _sees_all(self, node: ClusterNodeProcess) -> bool:
        if not node.accepting() or "cluster_state:ok" not in node.command("cluster", "info"):
            return False
        lines = [line.split() for line in node.command("cluster", "nodes").splitlines()]
        healthy = [
            line
            for line in lines
            if len(line) > 7 and "fail" not in line[2] and line[7] == "connected"
        ]
        return len(healthy) == len(self.nodes)

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start a killed master again on its port: it rejoins with its slots, empty."""
        self.nodes[index].start()
        self.wait_ok()

    def node_of(self, key: str) -> int:
        """The index of the master that serves ``key``'s slot (every node up)."""
        return _slot_owners(self)[key_slot(key.encode())]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def _wait(self, ready: object, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if ready():
                return
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited:\n{node.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"Redis Cluster not {what} after {STARTUP_S} s")

    def __enter__(self) -> RedisClusterProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spread_ids(cluster: RedisClusterProcess, prefix: str, per_master: int) -> list[str]:
    """Prompt ids, ``per_master`` on each master (their responses keys' slots), interleaved."""
    from service.baselines.redis_store import responses_key

    found: list[list[str]] = [[] for _ in cluster.nodes]
    owners = _slot_owners(cluster)
    n = 0
    while min(len(ids) for ids in found) < per_master:
        pid = f"{prefix}{n}"
        owner = owners[key_slot(responses_key(pid).encode())]
        if len(found[owner]) < per_master:
            found[owner].append(pid)
        n += 1
    return [pid for group in zip(*found, strict=True) for pid in group]


def _slot_owners(cluster: RedisClusterProcess) -> list[int]:
    owners = [-1] * 16384
    for index, node in enumerate(cluster.nodes):
        for line in node.command("cluster", "nodes").splitlines():
            fields = line.split()
            if "myself" in fields[2]:
                for entry in fields[8:]:
                    if not entry.startswith("["):
                        first, _, last = entry.partition("-")
                        for slot in range(int(first), int(last or first) + 1):
                            owners[slot] = index
    return owners


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    """A Redis Cluster of three masters of the test session's own; tests that kill a node use
    ``own_redis_cluster``."""
    with RedisClusterProcess(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def own_redis_cluster(tmp_path: Path) -> Iterator[RedisClusterProcess]:
    """A Redis Cluster of this test's own, to kill nodes of."""
    with RedisClusterProcess(tmp_path / "redis-cluster") as cluster:
        yield cluster
