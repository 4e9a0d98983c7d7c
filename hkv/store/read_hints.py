"""Read-ahead hints for large LMDB values, and the release of the map's resident pages.

Why: LMDB maps its file with MADV_RANDOM, so a cold 52 KiB record read through the map arrives
as 13 serial 4 KiB page faults. Before a batch's ``get`` calls, the disk tier finds where each
record lies (:mod:`.locate`, which reads only the B-tree: py-lmdb's own cursor positioning would
read the whole record) and asks the kernel for each with ``madvise(MADV_WILLNEED)``
(:func:`will_need`): the kernel reads every record of the batch in one request each,
asynchronously, so the reads overlap on the disk. A hint only asks the kernel to read pages of the
map early; it never changes what is read, so a wrong hint costs time, never correctness.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from pathlib import Path


_PAGE = mmap.PAGESIZE
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)


def will_need(address: int, nbytes: int) -> None:
    """Ask the kernel to start reading ``nbytes`` of mapped file at ``address`` (asynchronous)."""
    start = address - address % _PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), _MADV_WILLNEED)


RELEASE_EVERY_BYTES = 64 << 20  # map traffic between two releases of the mapped pages (the mapping grows faster than the traffic: B-tree pages, read-ahead)


class MappedPages:
    """Keeps the store's mapped pages from piling up in the process's resident set.

    Why: every record read (and some pages a write transaction walks) is reached through LMDB's
    shared, read-only memory map, and once touched a page stays mapped into this process: over a
    million-token context the RSS grows by most of the store (a 1M-token SmolLM2 run showed 1 GiB
    of ``data.mdb`` resident after 2 GiB were stored), although the kernel could drop those clean
    file pages at any time. After every ``every_bytes`` of traffic (:meth:`note`),
    :meth:`release` calls ``madvise(MADV_DONTNEED)`` on the mapping of ``data.mdb``: for a shared
    file mapping that only unmaps the pages (the page cache keeps them; the next access maps them
    again, with no disk read while they are cached), so it never changes what is read, and a
    reader in another thread at that moment simply faults its page back in. Linux only (found
    through ``/proc/self/maps``); elsewhere a no-op.
    """

    def __init__(self, data_file: Path, every_bytes: int = RELEASE_EVERY_BYTES) -> None:
        self.data_file = str(Path(data_file).resolve())
        self.every_bytes = every_bytes
        self.releases = 0
        self._pending = 0
        self._lock = threading.Lock()  # reader threads and the writer thread count traffic

    def note(self, nbytes: int) -> None:
        """Count ``nbytes`` of map traffic; release once ``every_bytes`` have gone by."""
        with self._lock:
            self._pending += nbytes
            due = self._pending >= self.every_bytes
            if due:
                self._pending = 0
        if due:
            self.release()

    def ranges(self) -> list[tuple[int, int]]:
        """``(start, end)`` addresses of this process's mappings of the data file (Linux)."""
        try:
            with open("/proc/self/maps") as maps:
                lines = [line for line in maps if line.rstrip().endswith(self.data_file)]
        except OSError:
            return []
        out = []
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == self.data_file and "s" in fields[1]:  # shared mappings only
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end))
        return out

    def release(self) -> int:
        """Unmap the data file's resident pages from this process; returns the bytes of mapping advised."""
        advised = 0
        for start, end in self.ranges():
            if _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
                advised += end - start
        self.releases += 1
        return advised
