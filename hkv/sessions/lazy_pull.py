"""A lazy pull (``remote.pull = "lazy"``): a session another machine committed, resumed from the
remote tier without copying its blocks first (docs/remote.md, "Lazy pull").

:func:`open_lazy` reads the session's record and tail, probes every block the local store lacks
(``EXISTS``, pipelined, no payloads) and reads every block's summary row (``MGET``): the session
then opens at once, its blocks registered with the tier manager as remote-backed
(:mod:`hkv.tiers.remote_blocks`). A block is brought into the local store when attention or the
prefetcher first needs it (:meth:`LazyPull.fetch`: one ``MGET`` per request, every record checked
as a whole pull checks it, written with its summary rows, unreferenced, in the background: the
read decodes the fetched bytes), and the rest in a thread after the first turn. The local store's invariants are a whole pull's: its session
record names local blocks only, so the record is committed (:meth:`LazyPull.commit_record`, or
the session's own next commit) once every block is local (:meth:`LazyPull.finish`); until then the
store holds unreferenced blocks, a prefix cache that verify and gc know, and a process killed
meanwhile leaves a store that verifies clean and a session that the next open pulls again
(the blocks already local are not fetched twice).

What a lazy open cannot promise, it leaves to the whole pull (:func:`hkv.sessions.remote.pull_session`,
which cuts the record at the first missing block and recomputes): a block or summary missing on
the server at open, or a tail that fails its checks, makes :func:`open_lazy` answer
:data:`WHOLE`. A block that vanishes after the open (evicted, its node down, damaged, the
server down) is a :class:`~hkv.errors.RemoteBlockLostError` at its read, before anything is read;
the session catches it, pulls whole and reruns the call (:class:`hkv.sessions.session.Session`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Final

import numpy as np
import torch

from ..blocks import RecordError, check_record
from ..errors import TierFullError
from ..remote.client import CHUNK, RemoteStore
from ..store.summary_rows import stored_row, summary_values
from ..store.txn import CommitResult, StoreTxn, summary_key
from ..threads import serial_thread
from ..tiers.remote_blocks import RemoteBlocks
from .records import SessionRecord, tail_key
from .remote import newer_remote_session, position_groups
from .rows import commit_in
from .store import SessionStore

log = logging.getLogger(__name__)
WHOLE: Final = "whole"  # open_lazy's answer when only a whole pull can resume the session
FETCH_KEYS = 4 * CHUNK  # blocks per background fetch (bounded memory: 1,024 SmolLM2 fp32 blocks are 50 MB)


class LazyPull:
    """One session opened lazily: its record and tail as the server holds them, its blocks'
    summary rows, and the blocks still remote. Made by :func:`open_lazy`; owned by the session,
    whose :meth:`stop` joins the background thread."""

    def __init__(self, store: SessionStore, remote: RemoteStore, record: SessionRecord, tail: bytes | None,
                 remote_keys: list[bytes], summaries: dict[bytes, bytes]) -> None:  # fmt: skip
        self.store, self.remote, self.record, self.tail = store, remote, record, tail
        self.name = record.name
        self.keys = record.key_digests()  # block-major
        self.groups = position_groups(self.keys, record.num_layers)
        self.remote_keys = remote_keys  # those the local store lacked at open
        self._summaries = summaries  # summary row key -> checksummed row (the frame the session scores)
        self.fetched_blocks = 0  # brought into the local store so far
        self.fetch_calls = 0  # remote reads that did it (a layer's blocks are one)
        self._blocks: RemoteBlocks | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- summaries, at open ---------------------------------------------------------------------
    def summary_arrays(self, keys_by_layer: list[list[bytes]], relative: bool, floats: int) -> list[torch.Tensor] | None:
        """Per layer, the fp32 summaries ``[blocks, floats]`` of the record's blocks in the
        ``relative`` frame; None if the server lacks one (or it fails its checksum)."""
        out = []
        for layer_keys in keys_by_layer:
            rows = np.empty((len(layer_keys), floats), dtype=np.float32)
            for i, key in enumerate(layer_keys):
                values = summary_values(self._summaries.get(summary_key(key, relative)), floats)
                if values is None:
                    return None
                rows[i] = values
            out.append(torch.from_numpy(rows))
        return out

    # -- blocks, on demand (tiers.remote_blocks calls this) -----------------------------------------
    def fetch(self, keys: list[bytes]) -> tuple[dict[bytes, bytes], Future | None]:
        """Fetch ``keys`` from the server, check each record (a missing or failing one is left
        out, logged), and submit their write into the local store with their summary rows,
        unreferenced: ``(records, the write's future)``. The reads take the records from the tier
        manager until the write is durable (:mod:`hkv.tiers.remote_blocks`): no read waits on it."""
        good: dict[bytes, bytes] = {}
        for key, value in zip(keys, self.remote.get_blocks(keys, self.groups)):
            if value is None:
                continue
            try:
                check_record(value, key, where=f"remote block {key.hex()} of session {self.name!r}")
                good[key] = value
            except RecordError as error:
                log.warning("remote tier: %s; the session is pulled whole and it is recomputed", error)
        self.fetch_calls += 1
        if not good:
            return good, None
        disk = self.store.disk
        summaries = [(where, stored_row(row, disk.layout.summary_floats, disk.compact_summaries))
                     for key in good for relative in (False, True)
                     if (row := self._summaries.get(where := summary_key(key, relative))) is not None]  # fmt: skip
        capacity, records = self.store.disk.capacity_bytes, list(good.items())

        def job(txn: StoreTxn) -> None:
            if txn.usage["used_bytes"] + sum(len(value) for _, value in records) > capacity:
                raise TierFullError(f"{self.store.path}: blocks of session {self.name!r} from the remote tier do not fit "
                                    f"tiers.disk = {capacity} bytes")  # fmt: skip
            for key, value in records:
                if txn.record_nbytes(key) is None:
                    txn.put_block(key, value)
            txn.put_many("summaries", summaries)

        self.fetched_blocks += len(good)
        return good, self.store.disk.submit_apply(job)

    # -- the rest, in the background; then the local record ---------------------------------------
    def attach(self, blocks: RemoteBlocks) -> None:
        """The tier manager's registry this pull's blocks were registered with."""
        self._blocks = blocks

    def start_background(self) -> None:
        """Pull the blocks still remote in a thread (chunks of FETCH_KEYS; best effort: a lost
        block is left to the read or :meth:`finish` that needs it). Once."""
        if self._thread is not None or self._blocks is None:
            return
        self._thread = serial_thread(self._background, name=f"hkv lazy pull {self.name}")
        self._thread.start()

    def _background(self) -> None:
        try:
            pending = self._blocks.pending(self)
            for start in range(0, len(pending), FETCH_KEYS):
                if self._stop.is_set():
                    return
                self._blocks.ensure(pending[start : start + FETCH_KEYS], strict=False)
        except Exception as error:  # noqa: BLE001 -- the thread must end quietly; finish() fetches what is left
            log.warning("remote tier: session %r: the background pull stopped: %s", self.name, error)

    def stop(self) -> None:
        """Stop the background pull (after the chunk in flight) and join it. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> None:
        """Bring every block still remote into the local store now; RemoteBlockLostError if one
        cannot be (nothing is committed then)."""
        self.stop()
        if self._blocks is None:
            return
        for start in range(0, len(self.remote_keys), FETCH_KEYS):
            self._blocks.ensure(self.remote_keys[start : start + FETCH_KEYS], strict=True)
        self._blocks.written(self)
        for start in range(0, len(self.remote_keys), FETCH_KEYS):  # a write that failed made its blocks lost
            self._blocks.ensure(self.remote_keys[start : start + FETCH_KEYS], strict=True)

    def commit_record(self) -> CommitResult:
        """Commit the pulled record and tail to the local store (after :meth:`finish`), as a
        whole pull does: the session is local from now on. What changed (for the tier manager)."""
        record, tail = self.record, self.tail

        def job(txn: StoreTxn) -> CommitResult:  # the summaries came with the blocks
            return commit_in(txn, record, self.keys[: record.kv_blocks * record.num_layers], [], tail, time.time())[0]

        return self.store.disk.apply(job)


def open_lazy(store: SessionStore, remote: RemoteStore, name: str, local: SessionRecord | None, *,
              relative: bool) -> LazyPull | str | None:  # fmt: skip
    """Session ``name`` from the server for a lazy open (see the module docstring): a LazyPull;
    None when the server has no newer copy than ``local`` (or none, or is down); :data:`WHOLE`
    when something is missing there already (a whole pull cuts and recomputes). ``relative``:
    the frame of the summaries the session's cache scores (:func:`~hkv.store.txn.summary_key`),
    the only one read."""
    got = newer_remote_session(remote, name, local)
    if got is None:
        return None
    record, tail = got
    if record.tail_tokens:
        try:
            check_record(tail, tail_key(name), where=f"remote tail of session {name!r}")
        except RecordError:
            return WHOLE
    keys = record.key_digests()
    groups = position_groups(keys, record.num_layers)
    with store.disk.reading() as txn:
        stored = set(txn.found("keys", keys))
    remote_keys = [key for key in dict.fromkeys(keys) if key not in stored]
    if not remote.holds_all(remote_keys, groups):
        return WHOLE
    where = [summary_key(key, relative) for key in dict.fromkeys(keys)]
    summaries = {row_key: row for row_key, row in zip(where, remote.get_summaries(where, groups)) if row is not None}
    if len(summaries) < len(where):
        return WHOLE
    return LazyPull(store, remote, record, tail if record.tail_tokens else None, remote_keys, summaries)
