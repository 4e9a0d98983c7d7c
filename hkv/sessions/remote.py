"""Sessions on the remote tier (``[remote]``, :mod:`hkv.remote.client`): pushed after each local
commit, pulled by a process whose local store lacks them, and one writer across machines.

- **Push** (:meth:`RemoteSync.push_later`): a commit is durable locally first; a background
  thread then copies the session to the server: the block records and summaries the server
  lacks (checked with pipelined ``EXISTS``, sent in pipelines of 256), then the tail and the
  record in one transaction, so a reader that finds the record finds its blocks. A push that
  fails (the server down) is retried with the server's backoff; nothing local waits on it.
- **Pull** (:func:`pull_session`): opening a session the local store lacks, or holds an older
  commit of (another machine went on with it), fetches its record
  and tail, then the blocks (``MGET``) and summaries the local store lacks, checks every record
  (header, key, checksum: a bad one is a miss, logged), and commits them to the local store in
  one transaction; then the session resumes as a local one. Blocks the server no longer holds
  (its memory limit evicted them, a cluster node is down) or that fail their checks are
  computed again at the next call, from the blocks before them, and the blocks after them are
  adopted (``Runtime.fill``): only the missing blocks' tokens (and the tail's) are recomputed,
  never an error.
- **Blocks outside sessions** (:meth:`RemoteSync.push_blocks_later`, ``remote.prefixes``): the
  blocks a plain ``rt.generate`` stored (``store.persist``) are pushed the same way, without a
  record, so that another machine's prompt with the same prefix adopts them.
- **Prefixes** (:func:`fetch_prefix`): before a fill adopts the stored prefix of a prompt
  (``store.reuse_prefix``), the blocks the server holds past the local store's run are copied
  in (checked, with their summaries, unreferenced: a prefix cache), so a document or system
  prompt one machine's session stored is not prefilled again by another.
- **Leases**: a session opened for writing takes ``P:lease:<name>`` on the server (``SET NX PX``,
  ``remote.lease_s``), renewed every third of that while it is open (taken again if the server
  lost it, restarted empty) and released on close; a lease held by another process is a
  SessionLockedError. With the server down, the session
  opens with its local lock alone (logged).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention.prefix import as_ids
from ..attention.sequence import SequenceKV
from ..blocks import BlockKey, RecordError, chain_hashes, check_record
from ..errors import TierFullError
from ..remote.client import CHUNK, RemoteStore
from ..store.summary_rows import stored_row
from ..store.txn import CommitResult, StoreTxn, summary_key
from ..threads import serial_thread
from .records import SessionError, SessionRecord, tail_key
from .rows import commit_in, record_key, tail_record_key
from .store import SessionStore

log = logging.getLogger(__name__)


def push_session(store: SessionStore, remote: RemoteStore, name: str) -> bool:
    """Copy session ``name`` (as committed locally) to the server; whether it got there."""
    with store.disk.reading() as txn:
        raw = txn.get("sessions", record_key(name))
        tail = txn.get("sessions", tail_record_key(name))
    if raw is None:
        return True  # deleted meanwhile: nothing to push
    raw, tail = bytes(raw), None if tail is None else bytes(tail)
    record = SessionRecord.from_bytes(name, raw)
    if not push_blocks(store, remote, record.key_digests(), record.num_layers):
        return False
    return remote.put_session(name, raw, tail)


def push_blocks(store: SessionStore, remote: RemoteStore, keys: list[bytes], layers: int) -> bool:
    """Copy to the server the blocks of ``keys`` (block-major, ``layers`` per position) that it
    lacks, with their summaries, from the local store (a block not stored locally is skipped);
    whether the server took them."""
    groups = position_groups(keys, layers)
    unique = list(groups)
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start : start + CHUNK]
        missing = [key for key, held in zip(chunk, remote.has_blocks(chunk, groups)) if not held]
        if not missing:
            continue
        with store.disk.reading() as txn:
            records = [(key, bytes(value)) for key in missing if (value := txn.record(key)) is not None]
            summaries = [(where, bytes(value)) for key in missing for where in (summary_key(key), summary_key(key, True))
                         if (value := txn.get("summaries", where)) is not None]  # fmt: skip
        if not remote.put_blocks(records, summaries, groups):
            return False
    return True


def position_groups(keys: list[bytes], layers: int) -> dict[bytes, bytes]:
    """Block key -> its group on the server (:mod:`hkv.remote.client`): the key of the same
    position's layer-0 block. ``keys``: block-major (every layer of a position in turn)."""
    return {key: keys[i - i % layers] for i, key in enumerate(keys)}


def _copy_blocks(store: SessionStore, remote: RemoteStore, keys: list[bytes], groups: dict[bytes, bytes]) -> set[bytes]:
    """Copy the blocks of ``keys`` (with their summaries) from the server into the local store,
    unreferenced, a chunk of 1,024 at a time (bounded memory: a 1M-token session is 23 GB); those
    now stored locally. A record missing on the server, or failing its checks (logged), is not."""
    stored: set[bytes] = set()
    capacity = store.disk.capacity_bytes
    floats = store.disk.layout.summary_floats
    for start in range(0, len(keys), 4 * CHUNK):
        chunk = keys[start : start + 4 * CHUNK]
        good: list[tuple[bytes, bytes]] = []
        for key, value in zip(chunk, remote.get_blocks(chunk, groups)):
            if value is None:
                continue
            try:
                check_record(value, key, where=f"remote block {key.hex()}")
                good.append((key, value))
            except RecordError as error:
                log.warning("remote tier: %s; recomputed instead", error)
        if not good:
            continue
        where = [summary_key(key, relative) for key, _ in good for relative in (False, True)]
        summaries = [(name, stored_row(value, floats, store.disk.compact_summaries))
                     for name, value in zip(where, remote.get_summaries(where, groups)) if value is not None]  # fmt: skip

        def job(txn: StoreTxn, good: list[tuple[bytes, bytes]] = good, summaries: list[tuple[bytes, bytes]] = summaries) -> list[bytes]:
            if txn.usage["used_bytes"] + sum(len(value) for _, value in good) > capacity:
                raise TierFullError(f"{store.path}: blocks from the remote tier do not fit tiers.disk = {capacity} bytes")
            for key, value in good:
                if txn.record_nbytes(key) is None:
                    txn.put_block(key, value)
            txn.put_many("summaries", summaries)
            return [key for key, _ in good]

        stored.update(store.disk.apply(job))
    return stored


def newer_remote_session(remote: RemoteStore, name: str, local: SessionRecord | None) -> tuple[SessionRecord, bytes | None] | None:
    """``(record, tail record or None)`` of session ``name`` on the server, unless the local copy
    ``local`` is as new (committed at the same time or later); None then, and when the server has
    no readable copy (logged) or is down."""
    got = remote.get_session(name)
    if got is None:
        return None
    raw, tail = got
    try:
        record = SessionRecord.from_bytes(name, raw)
    except SessionError as error:
        log.warning("remote tier: session %r is unreadable there (%s); not used", name, error)
        return None
    if local is not None and local.updated >= record.updated:
        return None
    return record, tail


def pull_session(store: SessionStore, remote: RemoteStore, name: str, local: SessionRecord | None = None) -> bool:
    """Copy session ``name`` from the server into the local store (see the module docstring)
    unless the local copy ``local`` is as new (committed at the same time or later); whether
    the local store now holds the server's copy."""
    got = newer_remote_session(remote, name, local)
    if got is None:
        return False
    record, tail = got
    layers, keys = record.num_layers, record.key_digests()
    with store.disk.reading() as txn:
        stored = set(txn.found("keys", keys))
    groups = position_groups(keys, layers)
    stored |= _copy_blocks(store, remote, [key for key in groups if key not in stored], groups)
    missing = [i for i in range(record.kv_blocks) if any(k not in stored for k in keys[i * layers : (i + 1) * layers])]
    kept = missing[0] if missing else record.kv_blocks
    if tail is not None:
        try:
            check_record(tail, tail_key(name), where=f"remote tail of session {name!r}")
        except RecordError as error:
            log.warning("remote tier: %s; its tokens are recomputed", error)
            tail = None
    if kept < record.kv_blocks or (tail is None and record.tail_tokens):
        # The local record references what the local store holds: its KV up to the first missing
        # block. The blocks after it stay in the local store (unreferenced, as a prefix cache), so
        # the next fill computes only the missing blocks' tokens and adopts the rest (Runtime.fill).
        log.warning("remote tier: session %r: %d of its %d blocks are missing there; their tokens (and the tail's) are recomputed",
                    name, len(missing), record.kv_blocks)  # fmt: skip
        record.kv_blocks, record.tail_tokens, tail = kept, 0, None
        record.kv_tokens = kept * record.block_tokens
    wanted = keys[: kept * layers]

    def job(txn: StoreTxn) -> CommitResult:  # the summaries came with the blocks
        return commit_in(txn, record, wanted, [], tail, time.time())[0]

    store.disk.apply(job)
    return True


def fetch_prefix(store: SessionStore, remote: RemoteStore, seq: SequenceKV, token_ids: torch.Tensor) -> int:
    """Copy into the local store the blocks the server holds that continue ``seq`` with
    ``token_ids`` past what the local store holds (another machine's sessions' blocks: a shared
    system prompt, a document), so that prefix adoption takes them; the blocks copied (every
    layer counted). Blocks after one the server lacks are copied too (the fill computes the
    missing one and adopts those after it); a block whose layer 0 the server lacks is not."""
    bt, first = seq.block_tokens, seq.sealed_blocks()
    previous = seq.prefix_chain()
    ids = as_ids(token_ids)
    count = len(ids) // bt
    if previous is None or count <= 0 or seq.seq_length() != first * bt:
        return 0
    chains = chain_hashes(ids[: count * bt], bt, previous=previous)
    layers = seq.num_layers
    keys = [bytes(key) for key in (BlockKey.make(seq.fingerprint, chain, layer) for chain in chains for layer in range(layers))]
    with store.disk.reading() as txn:
        stored = set(txn.found("keys", keys))
    start = next((i for i in range(count) if any(k not in stored for k in keys[i * layers : (i + 1) * layers])), count)
    if start == count:
        return 0
    groups = position_groups(keys, layers)
    held = remote.has_blocks(keys[start * layers :: layers], groups)  # layer 0 of each block: which the server has
    wanted = [key for i, ok in enumerate(held, start) if ok for key in keys[i * layers : (i + 1) * layers] if key not in stored]
    try:
        return len(_copy_blocks(store, remote, wanted, groups))
    except TierFullError:
        return 0  # no room: the prefix is computed instead


@dataclass(frozen=True, slots=True)
class BlocksPush:
    """Blocks to copy to the server outside a session (``remote.prefixes``): ``keys``
    block-major, ``layers`` per position."""

    keys: list[bytes]
    layers: int


class RemoteSync:
    """The remote tier of one runtime's sessions (leases, the push thread), and of the blocks a
    plain ``rt.generate`` stores when ``remote.prefixes`` (pushed by the same thread)."""

    def __init__(self, remote: RemoteStore, store: SessionStore, open_names: Callable[[], list[str]]) -> None:
        self.remote, self.store, self._open_names = remote, store, open_names
        self._queue: queue.SimpleQueue[str | BlocksPush | None] = queue.SimpleQueue()
        self._blocks_pending = 0  # BlocksPush queued and not done
        self._pending: dict[str, int] = {}  # session -> commits not yet pushed (a push reads the latest)
        self._release: set[str] = set()  # leases to release once their session's push is done
        self._idle = threading.Condition()
        self._thread = serial_thread(self._loop, name="hkv remote sessions")
        self._thread.start()

    def fetch_prefix(self, seq: SequenceKV, token_ids: torch.Tensor) -> int:
        return fetch_prefix(self.store, self.remote, seq, token_ids)

    def pull(self, name: str, local: SessionRecord | None = None) -> bool:
        return pull_session(self.store, self.remote, name, local)

    def acquire(self, name: str) -> bool | None:
        return self.remote.acquire(name)

    def release(self, name: str) -> None:
        self.remote.release(name)

    def release_after_push(self, name: str) -> None:
        """Release ``name``'s lease once its pending push is done (at once if none is)."""
        with self._idle:
            if name not in self._pending:
                self.remote.release(name)
                return
            self._release.add(name)

    def push_later(self, name: str) -> None:
        with self._idle:
            queued = name in self._pending
            self._pending[name] = self._pending.get(name, 0) + 1
        if not queued:
            self._queue.put(name)

    def push_blocks_later(self, keys: list[bytes], layers: int) -> None:
        """Copy these stored blocks (block-major) to the server in the background (once: a push
        that fails, the server down, is dropped; the next prompt that stores them pushes them)."""
        with self._idle:
            self._blocks_pending += 1
        self._queue.put(BlocksPush(keys, layers))

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every push asked for so far is done (or given up); whether none is left."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending and not self._blocks_pending, timeout=timeout)

    def _loop(self) -> None:
        renew_every = self.remote.config.lease_s / 3
        next_renew = time.monotonic() + renew_every
        while True:
            try:
                item = self._queue.get(timeout=max(0.05, next_renew - time.monotonic()))
            except queue.Empty:
                item = ""
            if item is None:
                return
            if time.monotonic() >= next_renew:
                for open_name in self._open_names():
                    # not renewed: a server restarted empty lost the lease; take it again
                    if not self.remote.renew(open_name) and self.remote.acquire(open_name) is False:
                        log.warning("remote tier: session %r lost its lease on %s and another process holds it now",
                                    open_name, self.remote.config.url)  # fmt: skip
                next_renew = time.monotonic() + renew_every
            if isinstance(item, BlocksPush):
                self._push_blocks(item)
            elif item:
                self._push_session(item)

    def _push_blocks(self, push: BlocksPush) -> None:
        try:
            push_blocks(self.store, self.remote, push.keys, push.layers)
        except Exception as error:  # noqa: BLE001 -- the thread must survive; the blocks stay local
            log.warning("remote tier: pushing %d blocks failed: %s", len(push.keys), error)
        with self._idle:
            self._blocks_pending -= 1
            self._idle.notify_all()

    def _push_session(self, name: str) -> None:
        with self._idle:
            seen = self._pending.get(name, 0)
        try:
            done = push_session(self.store, self.remote, name)
        except Exception as error:  # noqa: BLE001 -- the thread must survive; the local commit stands
            log.warning("remote tier: pushing session %r failed: %s", name, error)
            done = True
        with self._idle:
            if done and self._pending.get(name, 0) > seen:
                self._queue.put(name)  # committed again while it was pushed
            elif done or not self.remote.up:
                self._pending.pop(name, None)  # given up while the server is down: the next commit pushes again
                if name in self._release:
                    self._release.discard(name)
                    self.remote.release(name)
                self._idle.notify_all()
            else:
                self._queue.put(name)

    def close(self) -> None:
        self.flush(timeout=max(5.0, 3 * self.remote.config.timeout_s))
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.remote.close()
