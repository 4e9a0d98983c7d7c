"""The remote tier's client: block records, session rows and writer leases on a Redis (or
Valkey) server, shared by every hkv process that names it.

Keys (``P`` = ``remote.key_prefix``, ``G`` = a block's *group*: the key of the same position's
layer-0 block, where the caller knows it, else the block's own key): ``P:b:{<G hex>}<block key
hex>`` a block record (the same bytes as on disk: header, checksum, key); ``P:m:{<G hex>}<summary
key hex>`` its summary row (:func:`~hkv.store.txn.summary_key`); ``P:s:{<name>}`` a session
record; ``P:t:{<name>}`` its tail record; ``P:lease:{<name>}`` the session's writer lease. The
braces are a Redis Cluster hash tag: a session's rows share a node, so its record and tail are
written in one transaction; every layer's block of one position and their summaries share a
node, so a node lost takes whole positions (a position that lost one layer is recomputed in
every layer: with 30 layers, spreading layers over 3 nodes would lose nearly every position);
positions spread over every node. Block keys carry the model fingerprint and attention signature, so
every process with the same model and layout finds the same blocks. Nothing is pickled; every
record read is checked (header, key, checksum) by the caller before use.

A server that is down, slow or restarted never stops hkv: every call is bounded by
``remote.timeout_s``; a failure marks the server down (logged once per outage) and calls
return "nothing" until a retry time that backs off from 1 s to 60 s; the first call that
succeeds after it logs that the server is back. Reads and writes are batched (``MGET``, and
pipelines of ``SET``) in chunks of :data:`CHUNK` keys over the client's connection pool; with
``remote.cluster``, through redis-py's cluster client (keys grouped by node, one round trip
per node), and a node that is down makes only its keys misses.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from urllib.parse import urlparse

from ..blocks import KEY_BYTES
from ..config import RemoteConfig

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 256  # keys per MGET / pipeline
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"


def _server_errors() -> tuple[type[BaseException], ...]:
    """What a call raises when the server is down, slow or gone. redis is imported on first use
    (by the client, or here once a client raised): without ``[remote]`` a process never pays its
    import (about 80 ms, a part of every resume)."""
    import redis

    return (redis.ConnectionError, redis.TimeoutError, redis.exceptions.RedisClusterException, OSError)


class RemoteStore:
    """One process's connection to the remote tier of ``config`` (``config.url`` must be set)."""

    def __init__(self, config: RemoteConfig) -> None:
        self.config, self.prefix = config, config.key_prefix
        self.owner = f"{uuid.uuid4().hex}"  # this process's lease token
        self._made: redis.Redis | redis.RedisCluster | None = None  # connected on first use
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which the server is not tried
        self._backoff = 1.0
        self._down = False

    @property
    def _client(self) -> redis.Redis | redis.RedisCluster:
        """The client, made on first use (a cluster client asks its startup nodes for the slot
        map then, so a node down at start is a server-down failure like any other)."""
        if self._made is None:
            import redis
            from redis.cluster import ClusterNode

            options = dict(socket_timeout=self.config.timeout_s, socket_connect_timeout=self.config.timeout_s)
            if self.config.cluster:
                nodes = [urlparse(part.strip()) for part in self.config.url.split(",")]
                startup = [ClusterNode(node.hostname or "127.0.0.1", node.port or 6379) for node in nodes]
                self._made = redis.RedisCluster(startup_nodes=startup, **options)
            else:
                self._made = redis.Redis.from_url(self.config.url, health_check_interval=30, **options)
        return self._made

    # -- availability -----------------------------------------------------------------------------
    def _call(self, what: str, action: Callable[[], T], default: T) -> T:
        """``action()``, or ``default`` while the server is down (see the module docstring)."""
        with self._lock:
            if time.monotonic() < self._down_until:
                return default
        try:
            result = action()
        except _server_errors() as error:
            with self._lock:
                if not self._down:
                    log.warning("remote tier %s is unreachable (%s: %s); serving from the local tiers, retrying with backoff",
                                self.config.url, what, error)  # fmt: skip
                self._down = True
                self._down_until = time.monotonic() + self._backoff
                self._backoff = min(60.0, self._backoff * 2)
            return default
        with self._lock:
            if self._down:
                log.warning("remote tier %s is reachable again", self.config.url)
            self._down, self._backoff = False, 1.0
        return result

    @property
    def up(self) -> bool:
        """Whether the last call reached the server (a probe if it is marked down and due)."""
        return self._call("ping", lambda: bool(self._client.ping()), False)

    # -- keys ---------------------------------------------------------------------------------------
    def block_name(self, key: bytes, groups: Mapping[bytes, bytes] | None = None) -> str:
        """The server's key of block ``key`` (16 bytes); ``groups``: block key -> its group
        (the module docstring; a key not in it is its own group)."""
        group = key if groups is None else groups.get(key, key)
        return f"{self.prefix}:b:{{{group.hex()}}}{key.hex()}"

    def summary_name(self, key: bytes, groups: Mapping[bytes, bytes] | None = None) -> str:
        """The server's key of summary row ``key`` (a block key, + a frame suffix)."""
        block = key[:KEY_BYTES]
        group = block if groups is None else groups.get(block, block)
        return f"{self.prefix}:m:{{{group.hex()}}}{key.hex()}"

    def _session(self, name: str) -> str:
        return f"{self.prefix}:s:{{{name}}}"

    def _tail(self, name: str) -> str:
        return f"{self.prefix}:t:{{{name}}}"

    def _lease(self, name: str) -> str:
        return f"{self.prefix}:lease:{{{name}}}"

    # -- blocks and summaries -----------------------------------------------------------------------
    def _mget(self, names: list[str]) -> list[bytes | None]:
        if self.config.cluster:
            return self._cluster_mget(names)
        out: list[bytes | None] = []
        for start in range(0, len(names), CHUNK):
            out += self._client.mget(names[start : start + CHUNK])
        return out

    def _cluster_mget(self, names: list[str]) -> list[bytes | None]:
        """One MGET per node and chunk; a node that is down gives misses for its keys only."""
        out: list[bytes | None] = [None] * len(names)
        by_node: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            node = self._client.get_node_from_key(name)
            by_node.setdefault(node.name if node is not None else "", []).append(i)
        for indices in by_node.values():
            for start in range(0, len(indices), CHUNK):
                chunk = indices[start : start + CHUNK]
                try:
                    values = self._client.mget_nonatomic([names[i] for i in chunk])
                except _server_errors() as error:
                    log.warning("remote tier: a cluster node is unreachable (%s): %d blocks are misses", error, len(chunk))
                    continue
                for i, value in zip(chunk, values):
                    out[i] = value
        return out

    def _cluster_count(self, names: list[str]) -> int:
        """How many of ``names`` exist: one multi-key EXISTS per node and chunk (redis-py splits
        it by slot); a node that is down counts none of its keys (logged), the others answer."""
        by_node: dict[str, list[str]] = {}
        for name in names:
            node = self._client.get_node_from_key(name)
            by_node.setdefault(node.name if node is not None else "", []).append(name)
        found = 0
        for node_names in by_node.values():
            for start in range(0, len(node_names), CHUNK):
                try:
                    found += int(self._client.exists(*node_names[start : start + CHUNK]))
                except _server_errors() as error:
                    log.warning("remote tier: a cluster node is unreachable (%s): its blocks count as missing", error)
                    break
        return found

    def _put(self, items: list[tuple[str, bytes]]) -> int:
        for start in range(0, len(items), CHUNK):
            pipe = self._client.pipeline(transaction=False)
            for name, value in items[start : start + CHUNK]:
                pipe.set(name, value)
            pipe.execute()
        return len(items)

    def get_blocks(self, keys: Sequence[bytes], groups: Mapping[bytes, bytes] | None = None) -> list[bytes | None]:
        """The records of ``keys`` (None: not there, or the server is down); unchecked.
        ``groups``: as for :meth:`block_name`, in every method here."""
        return self._call("read blocks", lambda: self._mget([self.block_name(k, groups) for k in keys]), [None] * len(keys))

    def get_summaries(self, keys: Sequence[bytes], groups: Mapping[bytes, bytes] | None = None) -> list[bytes | None]:
        names = [self.summary_name(k, groups) for k in keys]
        return self._call("read summaries", lambda: self._mget(names), [None] * len(keys))

    def has_blocks(self, keys: Sequence[bytes], groups: Mapping[bytes, bytes] | None = None) -> list[bool]:
        """Which of ``keys`` the server holds (all False while it is down)."""

        def run() -> list[bool]:
            found: list[bool] = []
            for start in range(0, len(keys), CHUNK):
                pipe = self._client.pipeline(transaction=False)
                for key in keys[start : start + CHUNK]:
                    pipe.exists(self.block_name(key, groups))
                found += [bool(n) for n in pipe.execute()]
            return found

        return self._call("look up blocks", run, [False] * len(keys))

    def holds_all(self, keys: Sequence[bytes], groups: Mapping[bytes, bytes] | None = None) -> bool:
        """Whether the server holds every block of ``keys`` (False while it is down): one
        multi-key ``EXISTS`` per chunk (a count, no payloads); on a cluster, per node, a node
        that is down counting none (:meth:`_cluster_count`)."""
        if self.config.cluster:
            names = [self.block_name(key, groups) for key in keys]
            return self._call("look up blocks", lambda: self._cluster_count(names) == len(names), False)

        def run() -> bool:
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(keys), CHUNK):
                pipe.exists(*(self.block_name(key, groups) for key in keys[start : start + CHUNK]))
            return sum(pipe.execute()) == len(keys) if keys else True

        return self._call("look up blocks", run, False)

    def put_blocks(self, records: list[tuple[bytes, bytes]], summaries: list[tuple[bytes, bytes]] = (),
                   groups: Mapping[bytes, bytes] | None = None) -> bool:  # fmt: skip
        """Store block records and summary rows; whether the server took them."""
        items = [(self.block_name(k, groups), v) for k, v in records] + [(self.summary_name(k, groups), v) for k, v in summaries]
        return self._call("write blocks", lambda: self._put(items) >= 0, False)

    # -- sessions -----------------------------------------------------------------------------------
    def get_session(self, name: str) -> tuple[bytes, bytes | None] | None:
        """``(record, tail or None)`` of session ``name``; None if absent or the server is down."""

        def run() -> tuple[bytes, bytes | None] | None:
            record, tail = self._client.mget([self._session(name), self._tail(name)])
            return None if record is None else (record, tail)

        return self._call("read a session", run, None)

    def put_session(self, name: str, record: bytes, tail: bytes | None) -> bool:
        """Store a session's record and tail (after its blocks: a reader that finds the record
        finds them too, short of the server's own eviction)."""

        def run() -> bool:
            pipe = self._client.pipeline(transaction=True)
            if tail is None:
                pipe.delete(self._tail(name))
            else:
                pipe.set(self._tail(name), tail)
            pipe.set(self._session(name), record)
            pipe.execute()
            return True

        return self._call("write a session", run, False)

    def session_names(self) -> list[str] | None:
        """Names of the sessions on the server; None while it is down."""

        def run() -> list[str]:
            start = len(f"{self.prefix}:s:{{")
            found = self._client.scan_iter(match=f"{self.prefix}:s:{{*}}", count=1000)
            return sorted({bytes(key)[start:-1].decode("utf-8", "replace") for key in found})

        return self._call("list sessions", run, None)

    def delete_session(self, name: str) -> bool:
        return self._call("delete a session", lambda: bool(self._client.delete(self._session(name), self._tail(name))), False)

    # -- leases -------------------------------------------------------------------------------------
    def acquire(self, name: str) -> bool | None:
        """Take session ``name``'s writer lease for ``lease_s``: True if taken (or already
        ours), False if another process holds it, None if the server is down."""
        ms = int(self.config.lease_s * 1000)

        def run() -> bool:
            if self._client.set(self._lease(name), self.owner, nx=True, px=ms):
                return True
            return bool(self._client.eval(_RENEW, 1, self._lease(name), self.owner, ms))

        return self._call("take a lease", run, None)

    def renew(self, name: str) -> bool:
        return self._call("renew a lease", lambda: bool(self._client.eval(_RENEW, 1, self._lease(name), self.owner, int(self.config.lease_s * 1000))), False)

    def release(self, name: str) -> None:
        self._call("release a lease", lambda: self._client.eval(_RELEASE, 1, self._lease(name), self.owner), None)

    def close(self) -> None:
        if self._made is not None:
            self._made.close()
