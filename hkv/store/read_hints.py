"""Read-ahead hints for large LMDB values: one disk request per record instead of one per page.

Why: LMDB maps its file with MADV_RANDOM, and py-lmdb's ``get`` touches every page of a value
before returning it, so a cold 52 KiB record is read as 13 serial 4 KiB page faults (about 1 ms
on a cloud disk, and CPU-bound on a small machine). Before the ``get`` we therefore find where
the record lies in the map and ``madvise(MADV_WILLNEED)`` its pages: the kernel reads them in one
request, asynchronously, and the hints of a whole batch overlap on the disk.

How: ``cursor.set_key`` walks the B-tree without touching the value; ``cursor.key()`` (with
``buffers=True``) points into the leaf page, at the node holding the overflow page number. That
reads LMDB 0.9's node layout (8-byte node header before the key: data size lo/hi u16, flags
u16, key size u16; the overflow page number, u64, after the key; a 16-byte page header whose
first u64 is the page's own number). Every field is checked (key size, the big-data flag, the
record size), and :meth:`ReadHints.confirm` compares the predicted address with the one ``get``
returns: one mismatch turns the hints off. A hint only asks the kernel to read pages of the map
early; it never changes what is read, so a wrong hint costs time, never correctness.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from pathlib import Path

import lmdb
import numpy as np

_PAGE = mmap.PAGESIZE
_PAGE_HEADER = 16  # LMDB 0.9 page header bytes
_NODE_HEADER = 8  # LMDB 0.9 node header bytes
_F_BIGDATA = 0x01  # node flag: the data lives in overflow pages
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)


def will_need(address: int, nbytes: int) -> None:
    """Ask the kernel to start reading ``nbytes`` of mapped file at ``address`` (asynchronous)."""
    start = address - address % _PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), _MADV_WILLNEED)


def address_of(buffer: memoryview) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data if len(buffer) else 0


class ReadHints:
    """Predicts where records of ``record_nbytes`` with ``key_nbytes`` keys lie in an LMDB map."""

    def __init__(self, key_nbytes: int, record_nbytes: int) -> None:
        self.key_nbytes, self.record_nbytes = key_nbytes, record_nbytes
        self.layout_ok = lmdb.version()[:2] == (0, 9)  # the node layout read below is LMDB 0.9's
        self.enabled = self.layout_ok and record_nbytes > _PAGE // 2

    def record_location(self, cursor: lmdb.Cursor, key: bytes, *, any_size: bool = False) -> tuple[int, int] | None:
        """``(first overflow page number, record bytes)`` of the value under ``key``, or None if
        unknown (no such key, a small value on a leaf page, hints off). Touches only the B-tree.
        ``any_size``: also for records of another size than ``record_nbytes`` (another encoding),
        and keys of any length (rows of other databases)."""
        if not (self.enabled or any_size and self.layout_ok) or not cursor.set_key(key):
            return None
        key_nbytes = len(key) if any_size else self.key_nbytes
        key_address = address_of(cursor.key())
        node = key_address - _NODE_HEADER
        size_lo, size_hi, flags, key_size = (ctypes.c_uint16.from_address(node + 2 * i).value for i in range(4))
        size = size_lo | size_hi << 16
        if key_size != key_nbytes or not flags & _F_BIGDATA or size <= _PAGE // 2:
            return None
        if not any_size and size != self.record_nbytes:
            return None
        return ctypes.c_uint64.from_address(key_address + key_size).value, size

    def record_address(self, cursor: lmdb.Cursor, key: bytes) -> int:
        """Where ``get(key)`` will find the record, or 0 if unknown. Touches only the B-tree."""
        location = self.record_location(cursor, key)
        if location is None:
            return 0
        leaf_address = address_of(cursor.key())
        leaf = leaf_address - leaf_address % _PAGE
        map_base = leaf - ctypes.c_uint64.from_address(leaf).value * _PAGE
        return map_base + location[0] * _PAGE + _PAGE_HEADER

    def prefetch(self, cursor: lmdb.Cursor, keys: list[bytes]) -> list[int]:
        """Hint every record of ``keys``; their predicted addresses (0 where unknown)."""
        addresses = [self.record_address(cursor, key) for key in keys]
        for address in addresses:
            if address:
                will_need(address, self.record_nbytes)
        return addresses

    def confirm(self, predicted: int, record: memoryview) -> None:
        """Turn the hints off for good if a prediction missed the record ``get`` returned."""
        if predicted and predicted != address_of(record):
            self.enabled = False


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
