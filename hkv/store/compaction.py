"""Compaction: the dead bytes of segment files given back to the disk.

A deleted (or replaced) block leaves its record's bytes in its segment file; so does a batch
whose transaction never committed. A segment's dead share is ``1 - live / (file bytes - header)``,
``live`` from the ``meta/segments`` row (:mod:`.segment_rows`). Compacting a segment:

1. take the file's exclusive ``flock`` without waiting (held: another process appends to it or
   compacts it: skipped), never the segment this process appends to;
2. in one write transaction of the store's writer thread: find the index entries naming it,
   read and check each record (one that fails its checks stops the compaction of that segment:
   ``hkv sessions repair`` drops it), append them to the current segment (written and
   ``fdatasync``'ed), point the entries at their new places;
3. once that transaction is durable, delete the file.

A kill -9 at any point leaves every index entry naming a whole, durable record: before the
commit, the old places (the copies are dead bytes at the end of the new segment); after it, the
new ones, with the old file left over and no entry naming it, deleted by the next compaction
(its live share is 0), ``hkv sessions gc`` or ``repair``. A reader that looked a place up before
the commit and opens the file after its deletion looks the block up again
(:meth:`~hkv.store.block_store.BlockStore.get_many_into`).

Triggered by ``hkv sessions gc`` (:data:`GC_DEAD_SHARE`, and segment files no entry names) and,
in a store opened for writing by one process among others, after each delete that leaves a
segment more than :data:`AUTO_DEAD_SHARE` dead.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import lmdb

from ..blocks import RecordError, check_record
from .segment_rows import read_stats
from .space import free_bytes
from .segment_reads import SegmentReader
from .segments import PAGE, Place, SegmentWriter, fsync_dir, list_segments, lock_file, round_up, same_file, segment_path
from .txn import StoreTxn

log = logging.getLogger(__name__)

AUTO_DEAD_SHARE = 0.5  # a segment more dead than this is compacted after a delete
GC_DEAD_SHARE = 0.1  # `hkv sessions gc` compacts segments more dead than this
COPY_BYTES = 16 << 20  # records copied per segment write during a compaction


class SegmentStore(Protocol):
    """What compaction needs of a :class:`~hkv.store.block_store.BlockStore`."""

    path: Path
    segment_reader: SegmentReader
    segment_writer: SegmentWriter | None
    _env: lmdb.Environment
    _meta: object
    _index: object

    def submit_apply(self, apply: Callable[[StoreTxn], object], *, frees: bool = False) -> Future: ...


@dataclass(slots=True)
class SegmentUse:
    """One segment file: its bytes on disk and the record bytes (and records) the index names."""

    segment: int
    path: Path
    file_bytes: int
    live_bytes: int
    records: int

    @property
    def dead_share(self) -> float:
        room = self.file_bytes - PAGE
        return 1.0 if room <= 0 or self.records == 0 else max(0.0, 1.0 - self.live_bytes / room)


@dataclass(slots=True)
class CompactionReport:
    """What :func:`compact` did: segments copied out and deleted, files no entry named deleted,
    records and bytes moved, file bytes given back, and why any segment was left."""

    compacted: int = 0
    removed: int = 0
    moved_records: int = 0
    moved_bytes: int = 0
    freed_bytes: int = 0
    skipped: list[str] = field(default_factory=list)


def segment_use(store: SegmentStore) -> list[SegmentUse]:
    """Every segment file of the store with its live bytes, in id order."""
    with store._env.begin() as txn:
        stats = read_stats(txn, store._meta, store._index)
    out = []
    for segment, path in sorted(list_segments(store.path).items()):
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            continue
        live, records = stats.live.get(segment, (0, 0))
        out.append(SegmentUse(segment, path, size, live, records))
    return out


def _move_job(store: SegmentStore, segment: int) -> Callable[[StoreTxn], tuple[int, int]]:
    """The write job that copies ``segment``'s live records to the current segment and points
    their entries there: ``(records, bytes)`` moved. RecordError for a record that fails."""

    def run(txn: StoreTxn) -> tuple[int, int]:
        named: list[tuple[bytes, Place]] = []
        for key, entry in txn.items("keys"):
            if len(entry) != 8:
                place = Place.decode(entry)
                if place.segment == segment:
                    named.append((key, place))
        moved = moved_bytes = 0
        start = 0
        while start < len(named):
            chunk, size = [], 0
            while start < len(named) and (not chunk or size < COPY_BYTES):
                chunk.append(named[start])
                size += named[start][1].length
                start += 1
            records = []
            for key, place in chunk:
                record = store.segment_reader.read(place, bytes)
                check_record(record, key, where=f"block {key.hex()} in segment {segment}")
                records.append(record)
            for (key, _), new in zip(chunk, store.segment_writer.append(records)):
                txn.put_place(key, new)
            moved += len(chunk)
            moved_bytes += size
        return moved, moved_bytes

    return run


def compact(store: SegmentStore, threshold: float, *, current_too: bool = False) -> CompactionReport:
    """Compact every segment more than ``threshold`` dead (0 < share), and delete every segment
    file no index entry names, except those another process holds; see the module docstring.
    ``current_too``: this process's current segment as well (it then starts a new one: gc)."""
    report = CompactionReport()
    writer = store.segment_writer
    for use in segment_use(store):
        ours = writer is not None and writer.segment == use.segment
        if use.records and use.dead_share <= threshold:
            continue
        if ours:
            if not current_too:
                continue
            writer.close()  # appends go to a new segment; this one is compacted like the others
        if use.records and writer is None:
            report.skipped.append(f"segment {use.segment}: opened without segment writes (store.segments = false)")
            continue
        try:
            fd = os.open(use.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if not lock_file(fd) or not same_file(fd, use.path):
                continue  # another process appends to it or compacts it
            with store._env.begin() as txn:  # again, now that no one can append to it: the row is final
                use.live_bytes, use.records = read_stats(txn, store._meta, store._index).live.get(use.segment, (0, 0))
            if use.records and use.live_bytes + COPY_BYTES > free_bytes(store.path):
                report.skipped.append(f"segment {use.segment}: its {use.live_bytes} live bytes do not fit the free space")
                continue
            if use.records:
                try:
                    moved, moved_bytes = store.submit_apply(_move_job(store, use.segment)).result()
                except (RecordError, OSError) as error:
                    report.skipped.append(f"segment {use.segment}: {error}")
                    log.warning("%s: segment %d not compacted: %s", store.path, use.segment, error)
                    continue
                report.compacted += 1
                report.moved_records += moved
                report.moved_bytes += moved_bytes
            else:
                report.removed += 1
            os.unlink(use.path)
            fsync_dir(use.path.parent)
            store.segment_reader.forget(use.segment)
            report.freed_bytes += use.file_bytes
        finally:
            os.close(fd)
    return report


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _fallocate() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call


_FALLOCATE = _fallocate()


def punch_dead(folder: Path, places: Sequence[Place]) -> int:
    """Give the disk back the whole pages inside dead records at once, without copying
    (``fallocate(PUNCH_HOLE)``; only pages a record fills alone: its neighbours' bytes are never
    touched). Call only once the transaction that stopped naming them is durable. Bytes punched
    (0 where the filesystem cannot: compaction then reclaims them)."""
    if _FALLOCATE is None:
        return 0
    by_segment: dict[int, list[Place]] = {}
    for place in places:
        by_segment.setdefault(place.segment, []).append(place)
    punched = 0
    for segment, mine in by_segment.items():
        try:
            fd = os.open(segment_path(folder, segment), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # compacted away meanwhile
        try:
            for place in mine:
                start, end = round_up(place.offset), (place.offset + place.length) // PAGE * PAGE
                if end > start and _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start) == 0:
                    punched += end - start
        finally:
            os.close(fd)
    return punched
