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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server process: ``url``, ``stop()`` / ``start()`` (same port, empty again)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(redis.Redis(port=self.port))

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


class RedisCluster:
    """Three redis-server nodes in cluster mode (no replicas; the live nodes keep serving their
    slots when one dies: ``cluster-require-full-coverage no``). ``url`` names every node."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = [_free_port() for _ in range(3)]
        self.url = ",".join(f"redis://127.0.0.1:{port}" for port in self.ports)
        self.processes: list[subprocess.Popen | None] = []

    def start(self) -> None:
        for port in self.ports:
            node = self.folder / f"node-{port}"
            node.mkdir(parents=True, exist_ok=True)
            self.processes.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
                 "--cluster-require-full-coverage", "no", "--dir", str(node)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        for port in self.ports:
            _wait(redis.Redis(port=port))
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True)  # fmt: skip
        for _ in range(300):
            if all(redis.Redis(port=p).cluster("info")["cluster_state"] == "ok" for p in self.ports):
                return
            time.sleep(0.05)
        raise RuntimeError("the redis cluster did not come up")

    def node_of(self, key: str) -> int:
        """Index of the node serving ``key``."""
        slot = redis.RedisCluster(host="127.0.0.1", port=self.ports[0]).keyslot(key)
        for i, port in enumerate(self.ports):
            for start, end, *_ in redis.Redis(port=port).cluster("slots"):
                if start <= slot <= end and _[0][1] == port:
                    return i
        raise LookupError(key)

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


def _wait(client: redis.Redis) -> None:
    for _ in range(200):
        try:
            if client.ping():
                return
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


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
