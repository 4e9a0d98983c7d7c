"""Sessions' records in the LMDB store: identity, token ids, block references, tails, locks.

Layout and rules: docs/sessions-design.md, docs/store.md. This module knows LMDB records, not
models: the :class:`hkv.sessions.Session` layer computes keys, summaries and tails and calls it.
Everything that writes goes through the disk tier's writer thread (one nested transaction per
call, :meth:`hkv.tiers.disk.DiskTier.submit_apply`), so a commit is atomic and durable when its
call returns. Values, in the databases of a format-2 store:

* ``sessions``: ``s:<name>`` -> msgpack record + its xxh3-64 (8 bytes LE); ``t:<name>`` -> the
  tail KV, a block record (:func:`hkv.blocks.encode_record`) of ``[layers * 2, kv_heads,
  tail_tokens, head_dim]`` filed under a key derived from the name;
* ``summaries``: block key -> xxh3-64 (8 bytes LE) of the rest + fp32 ``[2, kv_heads, head_dim]``
  (min / max of the block's keys as stored); block key + ``b"r"`` -> the same of the keys rotated
  back to the block's first position (the relative frame, ``attention.positions = "remap"``);
* ``refs``: block key -> u32 LE count of committed sessions that reference the block.

Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from ..blocks import BlockKey, encode_record
from .session_lock import lock_file
from .session_ops import (
    RECORD_PREFIX,
    commit_in,
    decode_tail,
    drop_references,
    info_in,
    record_in,
    record_key,
    records_by_use,
    summary_values,
    tail_record_key,
    verify_session,
)
from .session_records import (  # noqa: F401  (the session API lives here for its users)
    NAME_PATTERN,
    RECORD_VERSION,
    CommitResult,
    CorruptSessionError,
    ModelIdentity,
    SessionError,
    SessionInfo,
    SessionLockedError,
    SessionMismatchError,
    SessionNameError,
    SessionNotFoundError,
    SessionRecord,
    VerifyReport,
    check_name,
    checksum,
    tail_key,
)
from .store_txn import StoreTxn, summary_key


class SessionStore:
    """Session records of one :class:`~hkv.tiers.disk.DiskTier` (the same LMDB environment).

    Thread-safe; several processes may use one store (LMDB orders writers; the lock file orders
    session writers)."""

    def __init__(self, disk, *, owns_disk: bool = False) -> None:  # disk: DiskTier (format 2 unless read-only)
        self.disk, self.path, self._owns_disk = disk, Path(disk.path), owns_disk
        self._locks = lock_file(self.path)

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = True) -> SessionStore:
        """Open the store at ``path`` without knowing its block layout (``hkv sessions``);
        :meth:`close` closes it. StoreError if it is not an hkv store, is of a newer format, or
        is already open in this process (LMDB allows one environment per process)."""
        from .disk import DiskTier

        return cls(DiskTier.open_existing(path, readonly=readonly), owns_disk=True)

    def close(self) -> None:
        """Close the disk tier if :meth:`open` opened it (else the owner closes it)."""
        if self._owns_disk:
            self.disk.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading (no lock, read transactions) ----------------------------------------------------
    def names(self) -> list[str]:
        with self.disk.reading() as store:
            return [key[len(RECORD_PREFIX) :].decode() for key, _ in store.items("sessions", RECORD_PREFIX)]

    def get(self, name: str) -> SessionRecord | None:
        """The committed record, None if absent; CorruptSessionError if it does not decode."""
        check_name(name)
        with self.disk.reading() as store:
            return record_in(store, name)

    def info(self, name: str) -> SessionInfo:
        """SessionNotFoundError if absent, CorruptSessionError if its record does not decode."""
        check_name(name)
        with self.disk.reading() as store:
            return info_in(store, name)

    def list(self) -> list[SessionInfo]:
        """All sessions, most recently used first; a corrupt one is listed with tokens = -1 (not raised)."""
        infos = []
        with self.disk.reading() as store:
            for key, _ in list(store.items("sessions", RECORD_PREFIX)):
                name = key[len(RECORD_PREFIX) :].decode()
                try:
                    infos.append(info_in(store, name))
                except SessionError as error:
                    infos.append(SessionInfo(name, -1, 0, 0, 0, 0, 0, 0, str(error), 0.0, 0.0, 0.0, 0))
        return sorted(infos, key=lambda info: -info.last_used)

    def read_tail(self, record: SessionRecord, out: torch.Tensor) -> None:
        """Fill ``out`` ``[layers, 2, kv_heads, tail_tokens, head_dim]`` (storage dtype, any device)
        from the tail record; CorruptSessionError naming the session if its checksum fails."""
        if out.shape[3] != record.tail_tokens:
            raise ValueError(f"read_tail: out {tuple(out.shape)} but session {record.name!r} has {record.tail_tokens} tail tokens")
        if record.tail_tokens == 0:
            return
        flat = (out.shape[0] * 2, *out.shape[2:])
        direct = out.device.type == "cpu" and out.is_contiguous()
        target = out.view(flat) if direct else torch.empty(flat, dtype=out.dtype)
        with self.disk.reading(buffers=True) as store:
            decode_tail(store, record.name, target)
        if not direct:
            out.copy_(target.view(out.shape))

    def read_summaries(self, keys: Sequence[BlockKey], out: torch.Tensor, *, relative: bool = False) -> int:
        """Fill ``out`` ``[n, 2, kv_heads, head_dim]`` fp32 (CPU) with the stored summaries of
        ``keys`` in order (``relative``: those of the relative frame, :func:`summary_key`);
        returns how many leading keys had an intact summary (stops at the first missing or
        corrupt one)."""
        if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or len(out) < len(keys):
            raise ValueError(f"read_summaries: out must be a contiguous CPU fp32 tensor of >= {len(keys)} rows")
        rows = out.view(len(out), -1).numpy()
        with self.disk.reading() as store:
            for i, key in enumerate(keys):
                values = summary_values(store.get("summaries", summary_key(bytes(key), relative)), rows.shape[1])
                if values is None:
                    return i
                rows[i] = values
        return len(keys)

    def present(self, keys: Sequence[BlockKey], *, relative: bool = False) -> int:
        """How many leading ``keys`` are stored with their summary (blocks + summaries dbs;
        ``relative``: the relative frame's)."""
        with self.disk.reading() as store:  # buffers: no copies, but 5x slower small gets
            for i, key in enumerate(keys):
                raw = bytes(key)
                if store.record_nbytes(raw) is None or store.get("summaries", summary_key(raw, relative)) is None:
                    return i
        return len(keys)

    def refs(self, keys: Sequence[BlockKey]) -> list[int]:
        """How many committed sessions reference each of ``keys``."""
        with self.disk.reading() as store:
            return [store.refs(bytes(key)) for key in keys]

    def referenced_keys(self) -> list[bytes]:
        """Every key with refs > 0 (the tier manager loads this when it opens the store; a count
        of 0 is never stored, so no value is read)."""
        with self.disk.reading() as store:
            return store.keys("refs")

    # -- writing (one write transaction each, durable on return) -----------------------------------
    def commit(self, record: SessionRecord, *, block_keys: Sequence[BlockKey], summaries: torch.Tensor | None,
               summary_keys: Sequence[BlockKey], tail: torch.Tensor | None, relative: bool = False) -> CommitResult:  # fmt: skip
        """Commit ``record`` atomically.

        ``block_keys``: every block the session now references (all layers; ``record.kv_blocks``
        x num_layers keys, those of :meth:`SessionRecord.block_keys`); those the previous
        commit did not reference must be in the store (else SessionError naming how many are
        missing; nothing changes); the others are, since their refs kept them there. Refs are
        incremented for keys the previous committed record did not reference (and decremented for
        keys it referenced and this one does not). ``summaries`` ``[len(summary_keys), 2,
        kv_heads, head_dim]`` fp32 are written for ``summary_keys`` (those stored; ``relative``:
        as relative-frame summaries, :func:`summary_key`). ``tail``:
        ``[layers, 2, kv_heads, tail_tokens, head_dim]`` in the storage dtype, or None when
        tail_tokens = 0. ``record.commits`` / ``created`` / ``updated`` / ``last_used`` are set
        here. CorruptSessionError if the previous record does not decode (delete it first)."""
        check_name(record.name)
        try:
            record.check()
        except ValueError as error:
            raise SessionError(f"session {record.name!r}: cannot commit: {error}") from None
        wanted = [bytes(key) for key in block_keys]
        if len(set(wanted)) != record.kv_blocks * record.num_layers:
            raise SessionError(
                f"session {record.name!r}: {len(set(wanted))} distinct block keys for {record.kv_blocks} blocks x "
                f"{record.num_layers} layers"
            )
        try:
            record.to_bytes()  # fails here, not in the writer, if a field does not encode
        except (TypeError, ValueError) as error:
            raise SessionError(f"session {record.name!r}: cannot encode its record: {error}") from None
        tail_record = self._encode_tail(record, tail)
        summary_values = self._encode_summaries(summary_keys, summaries, relative)
        frozen = dataclasses.replace(record, token_ids=np.array(record.token_ids, dtype=np.int64))

        def job(store: StoreTxn) -> tuple[CommitResult, SessionRecord]:
            return commit_in(store, frozen, wanted, summary_values, tail_record, time.time())

        result, stamped = self.disk.apply(job)
        record.commits, record.created, record.updated, record.last_used = (
            stamped.commits, stamped.created, stamped.updated, stamped.last_used
        )  # fmt: skip
        return result

    def put_summaries(self, keys: Sequence[BlockKey], summaries: torch.Tensor, *, relative: bool = False) -> Future:
        """Store summaries (no refs change; ``relative``: of the relative frame) of the ``keys``
        that are stored, asynchronously through the writer (write-through of sealed blocks,
        submitted after the blocks); a later commit or flush makes them durable. Returns the
        writer's future, whose result lists the positions in ``keys`` of the blocks that were not
        stored (their summaries were not written)."""
        values = self._encode_summaries(keys, summaries, relative)

        def job(store: StoreTxn) -> list[int]:
            skipped = []
            for i, (key, where, value) in enumerate(values):
                if store.record_nbytes(key) is not None:
                    store.put("summaries", where, value)
                else:
                    skipped.append(i)
            return skipped

        return self.disk.submit_apply(job)

    def touch(self, name: str) -> None:
        """Set last_used = now (one small transaction). SessionNotFoundError if absent."""
        check_name(name)

        def job(store: StoreTxn) -> None:
            record = record_in(store, name)
            if record is None:
                raise SessionNotFoundError(f"no session {name!r} in {self.path}")
            record.last_used = time.time()
            store.put("sessions", record_key(name), record.to_bytes())

        self.disk.apply(job)

    def delete(self, name: str, *, in_use: Callable[[bytes], bool] = lambda key: False) -> CommitResult:
        """Remove the session: refs decremented; blocks reaching 0 deleted unless ``in_use(key)``
        (called in the writer thread: it must not wait for anything). SessionNotFoundError if
        absent; SessionLockedError if another process has it open (one open in this process is
        the caller's business). The writer lock is held across the transaction, so no process can
        open the session between the check and the delete. A corrupt record is removed too, its
        references left counted (its blocks stay)."""
        check_name(name)
        if self.disk.readonly:
            raise SessionError(f"{self.path} is open read-only: session {name!r} cannot be deleted")
        ours = name in self._locks.held  # an open Session of this process (the caller's business)
        if not ours and not self._locks.acquire(name):
            raise SessionLockedError(f"session {name!r} is open for writing in another process; close it first")

        def job(store: StoreTxn) -> CommitResult:
            result = CommitResult()
            if store.get("sessions", record_key(name)) is None:
                raise SessionNotFoundError(f"no session {name!r} in {self.path}")
            try:
                record = record_in(store, name)
            except SessionError:
                record = None
            if record is not None:
                drop_references(store, record.block_keys(), in_use, result)
            store.delete("sessions", record_key(name))
            store.delete("sessions", tail_record_key(name))
            return result

        try:
            return self.disk.apply(job)
        finally:
            if not ours:
                self._locks.release(name)

    def reclaim(self, need_bytes: int, *, skip: set[str], in_use: Callable[[bytes], bool]) -> CommitResult:
        """Free at least ``need_bytes`` of block records if possible by dropping the KV of the
        least-recently-used sessions not in ``skip`` and not open for writing anywhere (their
        token ids stay, kv_tokens = 0). Stops once enough is freed; returns what changed. The
        writer lock of each session reclaimed is held until the transaction is durable (a process
        that opens it meanwhile is refused instead of reading the record about to change).
        ``in_use`` is called in the writer thread: it must not wait for anything."""
        taken: list[str] = []  # locks this call took (a job run twice keeps them)

        def job(store: StoreTxn) -> CommitResult:
            result = CommitResult()
            for record in records_by_use(store):
                if result.freed_bytes >= need_bytes:
                    break
                if record.kv_tokens == 0 or record.name in skip:
                    continue
                if record.name not in taken:
                    if not self._locks.acquire(record.name):  # open here or in another process
                        continue
                    taken.append(record.name)
                drop_references(store, record.block_keys(), in_use, result)
                store.delete("sessions", tail_record_key(record.name))
                record.kv_tokens = record.kv_blocks = record.tail_tokens = 0
                store.put("sessions", record_key(record.name), record.to_bytes())
                result.sessions.append(record.name)
            return result

        try:
            return self.disk.apply(job)
        finally:
            for name in taken:
                self._locks.release(name)

    def verify(self, name: str | None = None) -> VerifyReport:
        """Re-check the checksum of every record (session, tail, summaries, blocks) of ``name``
        (all sessions if None); corruption is reported per session, never raised.
        SessionNotFoundError if ``name`` is given and absent."""
        report = VerifyReport({}, 0, 0)
        checked: dict[bytes, str | None] = {}  # block key -> its problem (None: intact); shared blocks once
        with self.disk.reading(buffers=True) as store:
            if name is None:
                names = [key[len(RECORD_PREFIX) :].decode() for key, _ in store.items("sessions", RECORD_PREFIX)]
            elif store.get("sessions", RECORD_PREFIX + check_name(name).encode()) is None:
                raise SessionNotFoundError(f"no session {name!r} in {self.path}")
            else:
                names = [name]
            users = None if name is not None else _block_users(store, names)
            for session in names:
                report.problems[session] = verify_session(store, session, self.disk.layout, checked, report, users)
        return report

    # -- locks -------------------------------------------------------------------------------------
    def lock(self, name: str) -> SessionLock:
        """Take the session's writer lock; SessionLockedError if held elsewhere."""
        check_name(name)
        if self.disk.readonly:
            raise SessionError(f"{self.path} is open read-only: sessions cannot be opened for writing")
        if not self._locks.acquire(name):
            raise SessionLockedError(
                f"session {name!r} is open for writing elsewhere (another process, or another session here)"
            )
        return SessionLock(self._locks, name)

    def is_locked(self, name: str) -> bool:
        """Whether another process (or an open Session here) holds the writer lock."""
        return self._locks.is_locked(check_name(name))

    # -- encoding ----------------------------------------------------------------------------------
    def _encode_tail(self, record: SessionRecord, tail: torch.Tensor | None) -> bytes | None:
        layout = self.disk.layout
        if record.tail_tokens == 0:
            if tail is not None and tail.numel():
                raise ValueError(f"session {record.name!r}: a tail {tuple(tail.shape)} but tail_tokens = 0")
            return None
        shape = (record.num_layers, 2, layout.kv_heads, record.tail_tokens, layout.head_dim)
        if tail is None or tuple(tail.shape) != shape or tail.dtype != layout.dtype:
            got = None if tail is None else (tuple(tail.shape), tail.dtype)
            raise ValueError(f"session {record.name!r}: tail must be {list(shape)} {layout.dtype}, got {got}")
        flat = tail.detach().to("cpu").contiguous().view(shape[0] * 2, *shape[2:])
        return encode_record(tail_key(record.name), flat)

    def _encode_summaries(self, keys: Sequence[BlockKey], summaries: torch.Tensor | None,
                          relative: bool = False) -> list[tuple[bytes, bytes, bytes]]:  # fmt: skip
        """``(block key, summary key, checksummed value)`` per key."""
        layout = self.disk.layout
        if not keys:
            return []
        shape = (len(keys), 2, layout.kv_heads, layout.head_dim)
        if summaries is None or tuple(summaries.shape) != shape:
            raise ValueError(f"summaries must be {list(shape)} fp32, got {None if summaries is None else tuple(summaries.shape)}")
        rows = summaries.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").reshape(len(keys), -1)
        values = []
        for key, row in zip(keys, rows):
            payload = row.tobytes()
            values.append((bytes(key), summary_key(bytes(key), relative), checksum(payload) + payload))
        return values


def _block_users(store: StoreTxn, names: list[str]) -> Counter[bytes]:
    """How many of the sessions ``names`` (those whose record decodes) reference each block:
    what each block's ``refs`` count must be."""
    users: Counter[bytes] = Counter()
    for session in names:
        try:
            record = record_in(store, session)
        except SessionError:
            continue
        users.update(record.block_keys())
    return users


class SessionLock:
    """A held writer lock; ``release()`` (idempotent) or use as a context manager."""

    def __init__(self, locks, name: str) -> None:  # locks: session_lock.LockFile
        self._locks, self.name = locks, name
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._locks.release(self.name)

    def __enter__(self) -> SessionLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
