"""Block records read from ``data.mdb`` with O_DIRECT, at their place in the file, many at once.

Why: through LMDB's memory map a record is read by page faults and kernel read-ahead; O_DIRECT
makes each record one read request, with a batch's requests all in flight together, into memory
of our own (no page cache). Which is faster depends on the disk: on this project's cloud VM the
map with batch hints (:mod:`.read_hints`) measured faster (docs/store.md), so block reads use
O_DIRECT only with ``store.direct_reads = true``; a session's summary runs, large sequential
values, are always read this way where the filesystem allows.

How: under the caller's read transaction (which keeps LMDB from reusing the pages it sees), the
record's first overflow page is found from its B-tree node without touching the record
(:mod:`.locate`). The whole pages holding the record
(a 16-byte page header, then the record) are read with ``preadv`` on an O_DIRECT descriptor into
a page-aligned buffer, one request per record, by a pool of ``threads`` threads (``preadv``
releases the GIL). Each span's page header is checked (its own page number, the overflow flag,
the page count) before the record is handed back; the caller then checks the record itself as
always (header, key, checksum: :func:`hkv.blocks.decode_into`). A span that fails the check or
comes back short is read through the map instead, and so is every record where the filesystem
refuses O_DIRECT (tmpfs) or LMDB is not 0.9.

The kernel flushes dirty page-cache pages of a range before an O_DIRECT read of it, so a record
committed through LMDB's buffered writes is read as committed. The payload is copied once, from
the aligned buffer into the destination tensor (the record starts 16 bytes into its first page,
so the disk cannot write the payload straight into the tensor).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..threads import serial_torch

PAGE = mmap.PAGESIZE
PAGE_HEADER = 16  # LMDB 0.9: page number u64, pad u16, flags u16, overflow page count u32
P_OVERFLOW = 0x04
KEEP_BYTES = 64 << 20  # larger read buffers are not kept per thread
THREADS = 32  # requests in flight per store: what this machine's disk needs to reach its random-read speed
_HEADER = struct.Struct("<QHHI")


def span_pages(record_nbytes: int) -> int:
    """Pages holding a record of ``record_nbytes`` (with the overflow page header)."""
    return -(-(PAGE_HEADER + record_nbytes) // PAGE)


class _Buffers(threading.local):
    """One page-aligned buffer per thread, grown as needed."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None

    def get(self, nbytes: int) -> mmap.mmap:
        if nbytes > KEEP_BYTES:  # a one-off (a long session's summary runs): not kept for the thread's life
            return mmap.mmap(-1, nbytes)
        if self.buffer is None or len(self.buffer) < nbytes:
            # The old buffer is dropped, not closed: views of it from an earlier read may live on.
            self.buffer = mmap.mmap(-1, max(nbytes, 1 << 20))
        return self.buffer


class DirectReader:
    """O_DIRECT reads of overflow-page records from one ``data.mdb``.

    ``read(locations)`` returns, per ``(first page, record bytes)`` location (or None), a
    memoryview of the record, or None where it must be read through the map. The views are
    valid until the same thread's next ``read``. ``reads`` / ``fallbacks`` count records.
    """

    def __init__(self, data_file: Path, threads: int = THREADS) -> None:
        self.data_file = Path(data_file)
        self.threads = threads
        self.reads = 0
        self.fallbacks = 0  # spans that failed their page check or came back short: read through the map
        self.mismatches = 0  # spans whose record the map's copy contradicted
        self._fd: int | None = None
        self._tried = False
        self._pool: ThreadPoolExecutor | None = None
        self._buffers = _Buffers()
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        """Whether O_DIRECT reads work on this file (opened at the first call)."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._fd = self._open()
                    self._tried = True
        return self._fd is not None

    def _open(self) -> int | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(self.data_file, os.O_RDONLY | flag | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # EINVAL on filesystems without O_DIRECT (tmpfs)
            return None
        probe = mmap.mmap(-1, PAGE)
        try:
            os.preadv(fd, [probe], 0)  # some filesystems accept the flag at open and refuse the read
        except OSError:
            os.close(fd)
            return None
        finally:
            probe.close()
        return fd

    def disable(self) -> None:
        """Read through the map from now on (a span passed its page check but not the record's)."""
        with self._lock:
            fd, self._fd, self._tried = self._fd, None, True
        if fd is not None:
            os.close(fd)

    def read(self, locations: list[tuple[int, int] | None], *, owned: bool = False) -> list[memoryview | None]:
        """See the class docstring; ``owned``: into a buffer of this call's own, so the views stay
        valid as long as they are referenced (a restore keeps a session's summary runs so)."""
        fd = self._fd if self.available else None
        if fd is None:
            return [None] * len(locations)
        spans = [span_pages(loc[1]) * PAGE if loc is not None else 0 for loc in locations]
        starts = [0]
        for span in spans:
            starts.append(starts[-1] + span)
        buffer = mmap.mmap(-1, max(starts[-1], PAGE)) if owned else self._buffers.get(starts[-1])
        view = memoryview(buffer)
        jobs = [(i, loc[0]) for i, loc in enumerate(locations) if loc is not None]

        def pread(job: tuple[int, int]) -> int:
            i, page = job
            try:
                return os.preadv(fd, [view[starts[i] : starts[i] + spans[i]]], page * PAGE)
            except OSError:
                return -1

        if len(jobs) > 1:
            pool = self._thread_pool()
            done = list(pool.map(pread, jobs))
        else:
            done = [pread(job) for job in jobs]
        out: list[memoryview | None] = [None] * len(locations)
        for (i, page), nbytes in zip(jobs, done, strict=True):
            record_nbytes = locations[i][1]  # type: ignore[index]
            if nbytes != spans[i] or not self._header_ok(buffer, starts[i], page, record_nbytes):
                self.fallbacks += 1
                continue
            out[i] = view[starts[i] + PAGE_HEADER : starts[i] + PAGE_HEADER + record_nbytes]
            self.reads += 1
        return out

    @staticmethod
    def _header_ok(buffer: mmap.mmap, start: int, page: int, record_nbytes: int) -> bool:
        own_page, _pad, flags, pages = _HEADER.unpack_from(buffer, start)
        return own_page == page and flags & P_OVERFLOW != 0 and pages == span_pages(record_nbytes)

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="hkv-disk-read", initializer=serial_torch)
        return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            fd, self._fd, self._tried = self._fd, None, True
        if pool is not None:
            pool.shutdown(wait=True)
        if fd is not None:
            os.close(fd)

