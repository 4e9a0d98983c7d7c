"""Where a large value lies in ``data.mdb``, found by walking LMDB's B-tree ourselves.

Why: O_DIRECT reads (:mod:`.direct_reads`) need a record's first overflow page before reading
it, and py-lmdb cannot give it without reading the record: every cursor positioning and every
``get`` "preloads" the value (touches each of its pages, so that the copy that usually follows
does not fault with the GIL held). Read that way, each cold block was read twice, once 4 KiB at a
time through the map and once by O_DIRECT.

How: the named database's ``MDB_db`` record (a 48-byte value of the main database, read in the
caller's transaction, so its root is that snapshot's) gives the root page and the depth; branch
pages are searched for the last key <= the wanted one, the leaf for the key itself, as LMDB's
``mdb_page_search`` does with its default comparison (``memcmp`` over the shorter length, then
the shorter key first: Python's ``bytes`` order). The leaf node of a value in overflow pages
(``F_BIGDATA``) holds its first page number after the key. LMDB 0.9's layout (64-bit): page
header 16 bytes (page number u64, pad u16, flags u16, lower u16, upper u16), node offsets u16
after it; node header 8 bytes (lo u16, hi u16, flags u16, key size u16: for a leaf, lo | hi << 16
is the data size; for a branch, lo | hi << 16 | flags << 32 the child page).

Every page number is checked against the file's size and every page's type and node offsets
against the page before anything is read from it: damage makes a lookup return None (the caller
then reads through py-lmdb, whose own checks and :mod:`.pages` name the damage), never a read
outside the map. The pages walked are read through the map, as LMDB itself reads them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np

from .pages import F_BIGDATA, NODE_HEADER, P_BRANCH, P_LEAF, PAGE_HEADER
from .read_hints import will_need

_PAGE = mmap.PAGESIZE
_HEADER = struct.Struct("<QHHHH")  # page number, pad, flags, lower, upper
_CHILD = struct.Struct("<HHH")  # a node's lo, hi, flags
_KEY_SIZE = struct.Struct("<H")
_MAX_DEPTH = 16


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers as ``(first, count)`` runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for number in numbers:
        if runs and runs[-1][0] + runs[-1][1] == number:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif not runs or runs[-1][0] + runs[-1][1] < number:
            runs.append((number, 1))
    return runs


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


class Locator:
    """Finds the overflow pages of values in the named databases of one LMDB file."""

    def __init__(self, data_file: Path) -> None:
        self.data_file = Path(data_file)
        self.enabled = lmdb.version()[:2] == (0, 9)
        self.map_base = 0  # address of the map's page 0, as found by the last locate

    def locate(self, txn: lmdb.Transaction, main: object, db_name: bytes, keys: Sequence[bytes]) -> list[tuple[int, int] | None]:
        """Per key, ``(first overflow page, value bytes)`` in ``txn``'s snapshot, or None (not
        found, a small value kept on its leaf page, or anything unexpected). ``txn`` must have
        been begun with ``buffers=True`` and stay open while the pages are read; ``main``: the
        environment's main database (``env.open_db(None)``)."""
        tree = self._tree(txn, main, db_name) if keys else None
        if tree is None:
            return [None] * len(keys)
        map_base, pages, root, depth = tree
        return [self._find(map_base, pages, root, depth, bytes(key)) for key in keys]

    def _tree(self, txn: lmdb.Transaction, main: object, db_name: bytes) -> tuple[int, int, int, int] | None:
        """``(map base address, pages in the file, root page, depth)`` of database ``db_name``
        in ``txn``'s snapshot, from its ``MDB_db`` record; None where anything is unexpected.
        Sets :attr:`map_base`."""
        if not self.enabled:
            return None
        record = txn.get(db_name, db=main)  # the named database's MDB_db record
        if record is None or len(record) != 48:
            return None
        depth, root = struct.unpack_from("<H", record, 6)[0], struct.unpack_from("<Q", record, 40)[0]
        anchor = _address(record)
        page_start = anchor - anchor % _PAGE
        main_leaf = ctypes.c_uint64.from_address(page_start).value
        try:
            pages = os.stat(self.data_file).st_size // _PAGE
        except OSError:
            return None
        if not 1 <= depth <= _MAX_DEPTH or not 0 < root < pages or not main_leaf < pages:
            return None
        self.map_base = page_start - main_leaf * _PAGE
        return self.map_base, pages, root, depth

    def warm_leaves(self, txn: lmdb.Transaction, main: object, db_name: bytes) -> int:
        """Ask the kernel to read every leaf page of database ``db_name`` now, all at once
        (``madvise(MADV_WILLNEED)``, asynchronous), before a cursor walks them in key order: in
        a large store the leaves lie all over the file, and walked one fault at a time they cost
        a disk round trip each (about 2 s for the 122,880 keys of a 256K-token session). Reads the
        branch pages only; returns how many leaf pages were asked for (0 where the tree is not
        understood: nothing is asked, nothing changes)."""
        tree = self._tree(txn, main, db_name)
        if tree is None or tree[3] < 2:
            return 0
        map_base, pages, root, depth = tree
        level = [root]
        for _ in range(depth - 1):
            children = []
            for number in level:
                found = self._page(map_base, pages, number, P_BRANCH)
                if found is None:
                    return 0
                page, _, offsets = found
                for offset in offsets:
                    lo, hi, flags = _CHILD.unpack_from(page, offset)
                    child = lo | hi << 16 | flags << 32
                    if not 0 < child < pages:
                        return 0
                    children.append(child)
            level = children
        for start, count in _runs(sorted(level)):
            will_need(map_base + start * _PAGE, count * _PAGE)
        return len(level)

    @staticmethod
    def _page(map_base: int, pages: int, number: int, kind: int) -> tuple[bytes, int, list[int]] | None:
        """A copy of page ``number`` (4 KiB), its node count and node offsets, if it is of
        ``kind`` and sound (every node header within the page)."""
        if not 0 < number < pages:
            return None
        page = ctypes.string_at(map_base + number * _PAGE, _PAGE)
        own, _, flags, lower, upper = _HEADER.unpack_from(page)
        if own != number or not flags & kind or not PAGE_HEADER <= lower <= upper <= _PAGE or (lower - PAGE_HEADER) % 2:
            return None
        count = (lower - PAGE_HEADER) // 2
        offsets = list(struct.unpack_from(f"<{count}H", page, PAGE_HEADER))
        if count and max(offsets) + NODE_HEADER > _PAGE:
            return None
        return page, count, offsets

    @staticmethod
    def _key(page: bytes, offset: int) -> bytes | None:
        """Node key at ``offset``, if it lies within the page."""
        size = _KEY_SIZE.unpack_from(page, offset + 6)[0]
        start = offset + NODE_HEADER
        return page[start : start + size] if start + size <= _PAGE else None

    def _find(self, map_base: int, pages: int, root: int, depth: int, key: bytes) -> tuple[int, int] | None:
        number = root
        for _ in range(depth - 1):  # branch levels: the child whose range holds the key
            found = self._page(map_base, pages, number, P_BRANCH)
            if found is None:
                return None
            page, count, offsets = found
            low, high, chosen = 1, count - 1, 0  # node 0's key is implicitly below every key
            while low <= high:
                middle = (low + high) // 2
                node_key = self._key(page, offsets[middle])
                if node_key is None:
                    return None
                if node_key <= key:
                    chosen, low = middle, middle + 1
                else:
                    high = middle - 1
            lo, hi, flags = _CHILD.unpack_from(page, offsets[chosen])
            number = lo | hi << 16 | flags << 32
        found = self._page(map_base, pages, number, P_LEAF)
        if found is None:
            return None
        page, count, offsets = found
        low, high = 0, count - 1
        while low <= high:
            middle = (low + high) // 2
            node_key = self._key(page, offsets[middle])
            if node_key is None:
                return None
            if node_key == key:
                lo, hi, flags = _CHILD.unpack_from(page, offsets[middle])
                start = offsets[middle] + NODE_HEADER + len(key)
                if not flags & F_BIGDATA or start + 8 > _PAGE:
                    return None
                first = struct.unpack_from("<Q", page, start)[0]
                return (first, lo | hi << 16) if 0 < first < pages else None
            if node_key < key:
                low = middle + 1
            else:
                high = middle - 1
        return None
