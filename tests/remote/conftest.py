"""A real redis-server on a free loopback port for the remote-tier tests (Debian's package,
installed by the README's commands and .ci/run); the tests are skipped, saying so, on a machine
without it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (all probes held open at
    once, so no two are the same)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _free_port() -> int:
    return _free_ports(1)[0]


def _launch(folder: Path, port: int, options: list[str]) -> subprocess.Popen:
    """Start redis-server on ``port`` and wait (up to 30 s) until it answers; if it exits or
    never answers, raise with the end of its log."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"redis-{port}.log"
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder), "--logfile", str(log), *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if client.ping():
                return process
        except redis.ConnectionError:
            time.sleep(0.02)
    process.kill()
    process.wait()
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"redis-server on port {port} did not start (exit {process.returncode}); its log:\n{tail}")


class RedisServer:
    """One redis-server process: ``url``, ``stop()`` (kill -9) / ``start()`` (same port; empty
    again unless ``persistent``: an append-only file, fsynced at every write, that a restart
    loads)."""

    def __init__(self, folder: Path, *, persistent: bool = False) -> None:
        self.folder, self.port = folder, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.options = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []

    def start(self) -> None:
        self.process = _launch(self.folder, self.port, self.options)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; the README's commands do)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def persistent_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server whose restarts load its append-only file (``appendfsync always``)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; the README's commands do)")
    server = RedisServer(tmp_path / "persistent", persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RedisCluster:
    """Three redis-server nodes in cluster mode (no replicas; the live nodes keep serving their
    slots when one dies: ``cluster-require-full-coverage no``). ``url`` names every node."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # The cluster bus port is chosen too: redis's default (port + 10000) may pass 65535 or be taken.
        ports = _free_ports(6)
        self.ports, self.bus_ports = ports[:3], ports[3:]
        self.url = ",".join(f"redis://127.0.0.1:{port}" for port in self.ports)
        self.processes: list[subprocess.Popen | None] = []

    def start(self) -> None:
        for port, bus in zip(self.ports, self.bus_ports, strict=True):
            node = self.folder / f"node-{port}"
            node.mkdir(parents=True, exist_ok=True)
            self.processes.append(_launch(node, port, [
                "--cluster-enabled", "yes", "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no",
            ]))  # fmt: skip
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in self.ports):
                return
            time.sleep(0.05)
        raise RuntimeError("the redis cluster did not come up in 30 s")

    def node_of(self, key: str) -> int:
        """Index of the node serving ``key``."""
        return self.nodes_of([key])[0]

    def nodes_of(self, keys: list[str]) -> list[int]:
        """Index of the node serving each of ``keys`` (asked of every node: all must be up)."""
        ranges = [(start, end, i) for i, port in enumerate(self.ports)
                  for start, end, (_, owner, *_rest), *_ in redis.Redis(port=port).cluster("slots") if owner == port]  # fmt: skip
        nodes = []
        for key in keys:
            slot = key_slot(key.encode())
            nodes.append(next((i for start, end, i in ranges if start <= slot <= end), -1))
            if nodes[-1] < 0:
                raise LookupError(key)
        return nodes

    def keys_per_node(self, pattern: str) -> list[int]:
        return [sum(1 for _ in redis.Redis(port=port).scan_iter(match=pattern, count=1000)) for port in self.ports]

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process is not None:
            process.kill()
            process.wait()
            self.processes[index] = None

    def stop(self) -> None:
        for index in range(len(self.processes)):
            self.kill(index)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed (apt-get install redis-server; the README's commands do)")
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
