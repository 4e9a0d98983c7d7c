"""Sessions' records in the LMDB store: identity, token ids, block references, tails, locks.

Layout and rules: docs/sessions-design.md, docs/store.md. This module knows LMDB records, not
models: the :class:`hkv.sessions.session.Session` layer computes keys, summaries and tails and
calls it. Everything that writes goes through the store's writer thread (one nested transaction
per call, :meth:`hkv.store.block_store.BlockStore.submit_apply`), so a commit is atomic and
durable when its call returns. Values, in the databases of a format-2 store:

* ``sessions``: ``s:<name>`` -> msgpack record + its xxh3-64 (8 bytes LE); ``t:<name>`` -> the
  tail KV, a block record (:func:`hkv.blocks.encode_record`) of ``[layers * 2, kv_heads,
  tail_tokens, head_dim]`` filed under a key derived from the name;
* ``summaries``: the block summaries (:mod:`hkv.store.summary_rows`), written by a commit for the
  blocks whose write-through summary found no block;
* ``refs``: block key -> u32 LE count of committed sessions that reference the block.

Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..blocks import BlockKey, encode_record
from ..store.block_store import BlockStore
from ..store.summary_rows import encode_summaries
from ..store.txn import CommitResult, StoreTxn
from .locks import SessionLock, lock_file
from .records import (
    CorruptSessionError,
    SessionError,
    SessionInfo,
    SessionLockedError,
    SessionNotFoundError,
    SessionRecord,
    VerifyReport,
    check_name,
    tail_key,
)
from .summary_runs import delete_runs, put_run, read_runs
from .rows import (
    RECORD_PREFIX,
    commit_in,
    decode_tail,
    decode_tail_value,
    drop_references,
    info_in,
    record_in,
    record_key,
    records_by_use,
    session_names,
    tail_record_key,
    verify_session,
)


STORE_PROBLEMS = "(store)"  # VerifyReport.problems entry of what belongs to no session


class SessionStore:
    """Session records of one :class:`~hkv.store.block_store.BlockStore` (the same LMDB environment).

    Thread-safe; several processes may use one store (LMDB orders writers; the lock file orders
    session writers)."""

    def __init__(self, disk: BlockStore, *, owns_disk: bool = False) -> None:
        """``disk``: the store (format 2 unless read-only); closed by :meth:`close` if ``owns_disk``."""
        self.disk, self.path, self._owns_disk = disk, Path(disk.path), owns_disk
        self._locks = lock_file(self.path)

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = True, exclusive: bool = False) -> SessionStore:
        """Open the store at ``path`` without knowing its block layout (``hkv sessions``);
        :meth:`close` closes it. ``exclusive``: writable, with no other process writing it (for
        ``gc`` and ``repair``; StoreError if one is). StoreError if it is not an hkv store, is of
        a newer format, or is already open in this process (LMDB allows one environment per
        process)."""
        return cls(BlockStore.open_existing(path, readonly=readonly and not exclusive, exclusive=exclusive), owns_disk=True)

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
        with self.disk.reading() as txn:
            return session_names(txn)[0]

    def get(self, name: str) -> SessionRecord | None:
        """The committed record, None if absent; CorruptSessionError if it does not decode."""
        check_name(name)
        with self.disk.reading() as txn:
            return record_in(txn, name)

    def info(self, name: str) -> SessionInfo:
        """SessionNotFoundError if absent, CorruptSessionError if its record does not decode."""
        check_name(name)
        with self.disk.reading() as txn:
            return info_in(txn, name)

    def list(self) -> list[SessionInfo]:
        """All sessions, most recently used first; a corrupt one is listed with tokens = -1 (not raised)."""
        infos = []
        with self.disk.reading() as txn:
            names, bad = session_names(txn)
            for key in bad:
                shown = repr(key[len(RECORD_PREFIX) :])
                infos.append(SessionInfo(shown, -1, 0, 0, 0, 0, 0, 0, f"a session row whose name {shown} is not valid", 0.0, 0.0, 0.0, 0))
            for name in names:
                try:
                    infos.append(info_in(txn, name))
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
        with self.disk.reading(buffers=True) as txn:
            # One O_DIRECT read of the record's overflow pages: through the map, a cold tail (up
            # to 2.9 MB at SmolLM2's shape in fp32) was read a 4 KiB fault at a time (~70 ms).
            raw = self.disk.read_large_values("sessions", [tail_record_key(record.name)], txn)[0]
            try:
                decode_tail_value(raw, record.name, target)
            except CorruptSessionError:
                decode_tail(txn, record.name, target)  # read again through the map, which decides
        if not direct:
            out.copy_(target.view(out.shape))

    # -- writing (one write transaction each, durable on return) -----------------------------------
    def commit(self, record: SessionRecord, *, block_keys: Sequence[BlockKey], summaries: torch.Tensor | None,
               summary_keys: Sequence[BlockKey], tail: torch.Tensor | None, relative: bool = False) -> CommitResult:  # fmt: skip
        """Commit ``record`` atomically.

        ``block_keys``: every block the session now references (all layers; ``record.kv_blocks``
        x num_layers keys, those of :meth:`SessionRecord.key_digests`); those the previous
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
        summary_rows = encode_summaries(self.disk.layout, summary_keys, summaries, relative, compact=self.disk.compact_summaries)
        frozen = dataclasses.replace(record, token_ids=np.array(record.token_ids, dtype=np.int64))

        def job(txn: StoreTxn) -> tuple[CommitResult, SessionRecord]:
            return commit_in(txn, frozen, wanted, summary_rows, tail_record, time.time())

        result, stamped = self.disk.apply(job)
        record.commits, record.created, record.updated, record.last_used = (
            stamped.commits, stamped.created, stamped.updated, stamped.last_used
        )  # fmt: skip
        return result

    def put_summary_run(self, name: str, first: int, count: int, value: bytes) -> bool:
        """Add a summary run (:mod:`.summary_runs`) of blocks ``[first, first + count)`` to
        ``name``'s, after a commit; False (nothing written) unless its runs end at ``first``."""
        return self.disk.apply(lambda txn: put_run(txn, name, first, count, value, keep_blocks=first))

    def read_summary_runs(self, name: str, keys_by_layer: list[list[bytes]], relative: bool) -> list[list[np.ndarray]]:
        """Per layer, the summaries ``[count, 2 * kv_heads * head_dim]`` (fp16 or fp32) of each of the runs
        that hold ``name``'s leading blocks, in block order (:func:`~.summary_runs.read_runs`)."""
        return read_runs(self.disk, name, keys_by_layer, relative, self.disk.layout.summary_floats)

    def touch(self, name: str) -> None:
        """Set last_used = now (one small transaction). SessionNotFoundError if absent."""
        check_name(name)

        def job(txn: StoreTxn) -> None:
            record = record_in(txn, name)
            if record is None:
                raise SessionNotFoundError(f"no session {name!r} in {self.path}")
            record.last_used = time.time()
            txn.put("sessions", record_key(name), record.to_bytes())

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

        def job(txn: StoreTxn) -> CommitResult:
            result = CommitResult()
            if txn.get("sessions", record_key(name)) is None:
                raise SessionNotFoundError(f"no session {name!r} in {self.path}")
            try:
                record = record_in(txn, name)
            except SessionError:
                record = None
            if record is not None:
                drop_references(txn, record.key_digests(), in_use, result)
            txn.delete("sessions", record_key(name))
            txn.delete("sessions", tail_record_key(name))
            delete_runs(txn, name)
            return result

        try:
            return self.disk.apply(job, frees=True)
        finally:
            if not ours:
                self._locks.release(name)

    def reclaim(self, need_bytes: int, *, skip: set[str], in_use: Callable[[bytes], bool]) -> CommitResult:
        """Free at least ``need_bytes`` of block records by dropping the KV of the
        least-recently-used sessions not in ``skip`` and not open for writing anywhere (their
        token ids stay, kv_tokens = 0). Stops once enough is freed; returns what changed. All or
        nothing: when dropping every such session would not free ``need_bytes``, no session
        loses its KV (an eviction that cannot make the write fit would lose data for nothing). The
        writer lock of each session reclaimed is held until the transaction is durable (a process
        that opens it meanwhile is refused instead of reading the record about to change).
        ``in_use`` is called in the writer thread: it must not wait for anything."""
        taken: list[str] = []  # locks this call took (a job run twice keeps them)

        def job(txn: StoreTxn) -> CommitResult:
            result = CommitResult()
            for record in records_by_use(txn):
                if result.freed_bytes >= need_bytes:
                    break
                if record.kv_tokens == 0 or record.name in skip:
                    continue
                if record.name not in taken:
                    if not self._locks.acquire(record.name):  # open here or in another process
                        continue
                    taken.append(record.name)
                drop_references(txn, record.key_digests(), in_use, result)
                txn.delete("sessions", tail_record_key(record.name))
                delete_runs(txn, record.name)
                record.kv_tokens = record.kv_blocks = record.tail_tokens = 0
                txn.put("sessions", record_key(record.name), record.to_bytes())
                result.sessions.append(record.name)
            if result.freed_bytes < need_bytes:
                raise _NotEnough  # the nested transaction is dropped: nothing changed
            return result

        try:
            return self.disk.apply(job, frees=True)
        except _NotEnough:
            return CommitResult()
        finally:
            for name in taken:
                self._locks.release(name)

    def verify(self, name: str | None = None) -> VerifyReport:
        """Re-check the checksum of every record (session, tail, summaries, blocks) of ``name``
        (all sessions if None); corruption is reported per session, never raised.
        SessionNotFoundError if ``name`` is given and absent; StoreDamagedError if a B-tree page
        of the store is damaged (checked first when all sessions are verified)."""
        report = VerifyReport({}, 0, 0)
        if name is None:
            self.disk.check_pages()  # every page (at open, large trees had their branch pages checked)
        checked: dict[bytes, str | None] = {}  # block key -> its problem (None: intact); shared blocks once
        with self.disk.reading(buffers=True) as txn:
            bad: list[bytes] = []
            if name is None:
                names, bad = session_names(txn)
            elif txn.get("sessions", RECORD_PREFIX + check_name(name).encode()) is None:
                raise SessionNotFoundError(f"no session {name!r} in {self.path}")
            else:
                names = [name]
            users = None if name is not None else _block_users(txn, names)
            for session in names:
                report.problems[session] = verify_session(txn, session, self.disk.layout, checked, report, users)
        store_problems = [f"a session row whose name {key[len(RECORD_PREFIX) :]!r} is not a valid session name" for key in bad]
        usage = self.disk.usage_problem() if name is None else None
        store_problems += [usage] if usage is not None else []
        if store_problems:
            report.problems[STORE_PROBLEMS] = store_problems
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

class _NotEnough(Exception):
    """A reclaim that could not free what was asked (its changes are dropped)."""


def _block_users(txn: StoreTxn, names: list[str]) -> Counter[bytes]:
    """How many of the sessions ``names`` (those whose record decodes) reference each block:
    what each block's ``refs`` count must be."""
    users: Counter[bytes] = Counter()
    for session in names:
        try:
            record = record_in(txn, session)
        except SessionError:
            continue
        users.update(record.key_digests())
    return users
