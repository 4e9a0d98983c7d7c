"""Block records in append-only segment files beside the LMDB index (store format 3).

Why: LMDB writes a record through the page cache into whole 4 KiB overflow pages; a segment
takes each write batch's records packed end to end in one O_DIRECT write of whole pages, made
durable (``fdatasync``) before the LMDB transaction that names them commits
(docs/store.md, "Segment files").

Files: ``segments/NNNNNN.seg`` in the store folder; page 0 is a header (:data:`MAGIC`, the
segment id); records follow from byte :data:`PAGE` on, each batch starting on a page boundary.
A record is the block record of :mod:`hkv.blocks` (header, key, xxh3 checksum, payload), so a
record read from the wrong place fails its own checks. The ``keys`` index says where a record is
(:class:`Place`: record bytes, segment id, offset), and only what the index names is a record:
bytes after a segment's last indexed record (a batch whose transaction never committed, a
kill -9 in the middle of a write) are dead bytes, never read, reclaimed by compaction
(:mod:`.compaction`).

One process appends to a segment at a time: its writer holds an exclusive ``flock`` on the file
while it appends (and compaction while it copies a segment out), so a file no one holds is
closed for writing; a writer always starts a segment of its own (ids from ``O_CREAT | O_EXCL``,
never reused: the ``meta/segments`` row keeps the next id).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..blocks import HEADER_SIZE
from .files import SEGMENT_DIR

log = logging.getLogger(__name__)

PAGE = 4096  # O_DIRECT alignment (offsets, lengths, buffers) and the header's size
PAYLOAD_ALIGN = 512  # the smallest O_DIRECT alignment (a logical block): where raw payloads start
SEGMENT_BYTES = 256 << 20  # a writer starts a new segment past this size (bounds one compaction's copy)
MAGIC = b"HKVSEG\x00\x01"
_FILE_HEADER = struct.Struct("<8sI")  # magic, segment id; the rest of page 0 is zero
_NAME = re.compile(r"^(\d{6,10})\.seg$")
_KEEP_BYTES = 64 << 20  # larger per-thread buffers are not kept
OWN_BUFFER_BYTES = 256 << 10  # a job's own buffer at least this large is written as it is; smaller jobs are packed together
_IOV_MAX = 512  # buffers per pwritev (the kernel's limit is 1024)


@dataclass(frozen=True, slots=True)
class Place:
    """Where a record is: ``length`` bytes at byte ``offset`` of segment ``segment``.

    Encoded in the ``keys`` index as 20 bytes, ``u64 length | u32 segment | u64 offset`` (LE):
    the record length first, so an index entry's first 8 bytes are its record's size whether it
    names a segment or (8 bytes alone: formats 1-2) a record in LMDB's ``blocks`` database."""

    segment: int
    offset: int
    length: int

    _ENTRY = struct.Struct("<QIQ")

    def encode(self) -> bytes:
        return self._ENTRY.pack(self.length, self.segment, self.offset)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Place | None:
        """The place an index entry names; None for an 8-byte entry (the record is in LMDB).
        ValueError for any other size."""
        if len(raw) == 8:
            return None
        if len(raw) != cls._ENTRY.size:
            raise ValueError(f"a key index entry of {len(raw)} bytes (8 or {cls._ENTRY.size} expected)")
        length, segment, offset = cls._ENTRY.unpack(raw)
        return cls(segment, offset, length)


def entry_length(raw: bytes | memoryview) -> int:
    """Record bytes an index entry (either form) says."""
    return int.from_bytes(bytes(raw[:8]), "little")


def segment_path(folder: Path, segment: int) -> Path:
    return folder / SEGMENT_DIR / f"{segment:06d}.seg"


def list_segments(folder: Path) -> dict[int, Path]:
    """Segment id -> file, of the store folder ``folder`` (other names are not segments)."""
    try:
        names = os.listdir(folder / SEGMENT_DIR)
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        match = _NAME.match(name)
        if match:
            found[int(match.group(1))] = folder / SEGMENT_DIR / name
    return found


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_file(fd: int) -> bool:
    """Take the exclusive ``flock`` of a segment file without waiting; whether it was free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _open_direct(path: Path, flags: int) -> tuple[int, bool]:
    """Open ``path`` with O_DIRECT where the filesystem allows (not tmpfs), else buffered;
    the descriptor and whether it is direct."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct | os.O_CLOEXEC, 0o644), True
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
    return os.open(path, flags | os.O_CLOEXEC, 0o644), False


class ThreadBuffers(threading.local):
    """One page-aligned buffer per thread, grown as needed."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None

    def get(self, nbytes: int) -> mmap.mmap:
        if nbytes > _KEEP_BYTES:
            return mmap.mmap(-1, nbytes)
        if self.buffer is None or len(self.buffer) < nbytes:
            self.buffer = mmap.mmap(-1, max(nbytes, 1 << 20))
        return self.buffer


def round_up(nbytes: int, to: int = PAGE) -> int:
    return -(-nbytes // to) * to


def record_shift(at: int, record_nbytes: int) -> int:
    """Bytes of padding before a record placed at byte ``at`` of a page-aligned write. A record
    whose payload is a whole number of :data:`PAYLOAD_ALIGN` units (a raw block: 48 KiB for
    SmolLM2 in fp16) starts so that its payload does, 448 bytes at most (0.9% of such a record):
    an O_DIRECT read can then put the payload straight into an aligned tensor row
    (:mod:`.segment_reads`). Other records (the lossy encodings') are packed."""
    if (record_nbytes - HEADER_SIZE) % PAYLOAD_ALIGN:
        return 0
    return -(at + HEADER_SIZE) % PAYLOAD_ALIGN


def record_starts(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where records of ``sizes`` bytes go in a page-aligned write, one after the other with
    :func:`record_shift`'s padding: each record's first byte, and the byte after the last."""
    starts, end = [], 0
    for size in sizes:
        end += record_shift(end, size)
        starts.append(end)
        end += size
    return starts, end


@dataclass(slots=True)
class StagedRecords:
    """One write job's records; ``buffer``: a page-aligned buffer (an anonymous mmap) that holds
    them from byte 0, packed but for :func:`record_shift`'s padding, zero after them up to its
    end, or None."""

    records: list[bytes | bytearray | memoryview]
    buffer: memoryview | None = None


class SegmentWriter:
    """Appends record batches to this process's current segment of the store folder ``folder``
    (writer thread only). ``next_id()`` gives the lowest id the store has not used (from its
    ``meta/segments`` row); ``align``: each record starts at a multiple of this many bytes (1:
    packed, the default; :data:`PAGE`: each record padded to whole pages, measured in
    docs/store.md)."""

    def __init__(self, folder: Path, next_id: Callable[[], int], *, segment_bytes: int = SEGMENT_BYTES, align: int = 1) -> None:
        self.folder, self._next_id, self.segment_bytes, self.align = Path(folder), next_id, segment_bytes, align
        self.segment: int | None = None  # the id appended to, None before the first append
        self.direct = False
        self._fd: int | None = None
        self._end = 0
        self._buffer = ThreadBuffers()
        self._lock = threading.RLock()  # the prepare thread, the writer thread (compaction), close
        self._retired: list[int] = []  # descriptors (and locks) of the segments filled before this one

    def append(self, records: Sequence[bytes | bytearray | memoryview]) -> list[Place]:
        """Write ``records`` after the current segment's end, durably (:meth:`append_jobs`)."""
        return self.append_jobs([StagedRecords(list(records))])[0]

    def append_jobs(self, jobs: Sequence[StagedRecords]) -> list[list[Place]]:
        with self._lock:
            return self._append_jobs(jobs)

    def _append_jobs(self, jobs: Sequence[StagedRecords]) -> list[list[Place]]:
        """Write the records of ``jobs`` after the current segment's end in one ``pwritev`` of
        whole pages, then ``fdatasync``: when this returns they are durable; their places, per
        job. A job whose records already lie packed in a page-aligned buffer of at least
        :data:`OWN_BUFFER_BYTES` is written from it (no copy); the others are copied, packed,
        into a staging buffer. OSError (ENOSPC...) as raised: the bytes written, if any, are
        given back (the file is cut to its old end)."""
        pieces: list[tuple[memoryview | None, int, int]] = []  # (own buffer, 0, span) or (None, staging from, to)
        relative: list[list[int]] = []  # record offsets from the write's start, per job
        copies: list[tuple[int, bytes | bytearray | memoryview]] = []  # (staging offset, record)
        pos = stage = 0  # bytes of this write so far; of the staging buffer used
        for job in jobs:
            offsets = []
            if job.buffer is not None and len(job.buffer) >= OWN_BUFFER_BYTES:
                if pieces and pieces[-1][0] is None:  # end the staged run on a page
                    stage, pos = round_up(stage), round_up(pos)
                starts, at = record_starts([len(record) for record in job.records])  # as StagingBuffers.take laid them
                offsets.extend(pos + start for start in starts)
                pieces.append((job.buffer[: round_up(at)], 0, round_up(at)))
                pos += round_up(at)
            else:
                if not pieces or pieces[-1][0] is not None:
                    pieces.append((None, stage, stage))
                for record in job.records:
                    shift = round_up(stage, self.align) - stage
                    shift += record_shift(stage + shift, len(record))  # stage and pos differ by whole pages
                    stage, pos = stage + shift, pos + shift
                    offsets.append(pos)
                    copies.append((stage, record))
                    stage, pos = stage + len(record), pos + len(record)
                pieces[-1] = (None, pieces[-1][1], stage)
            relative.append(offsets)
        stage, pos = round_up(stage), round_up(pos)
        if pos == 0:
            return [[] for _ in jobs]
        if self._fd is None or (self._end + pos > self.segment_bytes and self._end > PAGE):
            self._start_segment()
        staging = memoryview(self._buffer.get(max(stage, PAGE)))
        for at, record in copies:
            staging[at : at + len(record)] = record
        views = []
        for own, first, last in pieces:
            if own is not None:
                views.append(own)
            else:
                padded = round_up(last)
                staging[last:padded] = bytes(padded - last)  # no stale bytes of an earlier write on disk
                views.append(staging[first:padded])
        self._write(views)
        out = [[Place(self.segment, self._end + offset, len(record)) for offset, record in zip(offsets, job.records)]
               for job, offsets in zip(jobs, relative)]  # fmt: skip
        self._end += pos
        return out

    def _write(self, views: list[memoryview]) -> None:
        written = 0
        try:
            for start in range(0, len(views), _IOV_MAX):  # a short write (a nearly full disk) raises below
                chunk = views[start : start + _IOV_MAX]
                size = sum(len(v) for v in chunk)
                done = os.pwritev(self._fd, chunk, self._end + written)
                written += done
                if done != size:
                    raise OSError(errno.ENOSPC, f"short write ({done} of {size} bytes)")
            os.fdatasync(self._fd)
        except OSError:
            try:  # nothing names these bytes: give them back (a full disk needs them)
                os.ftruncate(self._fd, self._end)
            except OSError:
                pass
            raise

    def _start_segment(self) -> None:
        if self._fd is not None:
            # Still held: a batch written there may not be committed yet (the writer commits while
            # the next batch is written), and a segment no one holds may be deleted as unnamed.
            self._retired.append(self._fd)
            self._fd, self.segment = None, None
        seg_dir = self.folder / SEGMENT_DIR
        if not seg_dir.is_dir():
            seg_dir.mkdir(exist_ok=True)
            fsync_dir(self.folder)
        segment = max(self._next_id(), max(list_segments(self.folder), default=0) + 1)
        while True:
            path = segment_path(self.folder, segment)
            try:
                fd, direct = _open_direct(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)
            except FileExistsError:
                segment += 1
                continue
            # Locked, and still the file at that path (gc may have taken an unlocked, unnamed file
            # away between our create and our lock): ours alone from here on.
            if lock_file(fd) and same_file(fd, path):
                break
            os.close(fd)
            segment += 1
        header = mmap.mmap(-1, PAGE)
        try:
            _FILE_HEADER.pack_into(header, 0, MAGIC, segment)
            os.pwrite(fd, header, 0)
            os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            raise
        finally:
            header.close()
        fsync_dir(seg_dir)  # the file's name is durable before any index entry names it
        self._fd, self.direct, self.segment, self._end = fd, direct, segment, PAGE

    def close(self) -> None:
        """Stop appending; drop the locks of every segment this writer filled (call only when
        everything written is committed or abandoned); the next append starts a new segment."""
        with self._lock:
            for fd in self._retired + ([self._fd] if self._fd is not None else []):
                os.close(fd)
            self._retired, self._fd, self.segment = [], None, None
