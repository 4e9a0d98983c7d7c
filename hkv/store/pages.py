"""A check of LMDB's B-tree pages before LMDB walks them.

LMDB trusts its pages: a page whose type flag, node offsets or child page numbers are damaged
can make it fail an assertion (``mdb_cursor_next: Assertion 'IS_LEAF(mp)'``, SIGABRT) or read
outside the map (SIGSEGV), killing the process. :func:`check_pages` walks the trees the way
LMDB would and checks every page it reaches, so that damage is a
:class:`~hkv.errors.StoreDamagedError` naming the database and the page, never a signal.

What is checked, per page (LMDB 0.9, 64-bit layout, ``mdb.c``): the page number in its header is
the one its parent names; a branch page above the tree's depth and a leaf page at it, nothing
else; ``lower`` / ``upper`` within the page and ordered; every node offset and node (key, and
inline data) within the page; every child or overflow page number within the file's pages in
use (``mm_last_pg``); an overflow page's header (its number, type, and a page count that holds
the value); in the databases whose keys have a fixed size (``KEY_SIZES``), every key's size. Sub-databases are found through the main database's leaves, as LMDB finds them.

Cost: one read of each branch and leaf page, and of each overflow header. A tree of at most
``budget_pages`` pages, overflow pages included (from its ``MDB_db`` record, before reading it),
is checked whole; a larger one has only its branch pages checked at open (``hkv sessions
verify`` and ``repair`` check every page): see docs/store.md. (Counting the overflow pages
matters: an 8K-token SmolLM2 store has 3,840 records in few leaf pages, and reading each
record's overflow header cold took 0.6 s of every open.)
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreDamagedError

P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
_IGNORED_FLAGS = 0x10 | 0x4000 | 0x8000  # P_DIRTY, P_LOOSE, P_KEEP: in-memory states
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
PAGE_HEADER, NODE_HEADER, DB_RECORD = 16, 8, 48
P_INVALID = 2**64 - 1
_META_DBS = 40  # mm_dbs[FREE_DBI] at 40, mm_dbs[MAIN_DBI] at 88
_LAST_PAGE, _TXNID, _MAGIC = 136, 144, 0xBEEFC0DE
BUDGET_PAGES = 1024  # pages of one tree (overflow pages included) checked whole at open: at most ~0.15 s of cold reads
# Key sizes of the hkv databases whose keys are fixed (a damaged key-size field is caught here,
# not by a caller meeting an 80-byte "block key"); the others (meta, sessions) vary.
KEY_SIZES = {b"blocks": (16,), b"keys": (16,), b"refs": (16,), b"summaries": (16, 17)}


@dataclass(slots=True)
class TreeInfo:
    """An ``MDB_db`` record: the tree's depth, page counts and root page."""

    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int

    @classmethod
    def parse(cls, raw: bytes | memoryview, at: int = 0) -> TreeInfo:
        _, flags, depth, branch, leaf, overflow, entries, root = struct.unpack_from("<IHHQQQQQ", raw, at)
        return cls(flags, depth, branch, leaf, overflow, entries, root)


class _Pages:
    """The pages of ``data.mdb`` in use, read through one read-only map."""

    def __init__(self, data: Path) -> None:
        fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
            if self.map is not None and hasattr(mmap, "MADV_RANDOM"):
                # One page per read: the kernel's read-ahead would read 32 pages around every
                # branch page (3 ms each cold, 5 s at the open of a 256K-token store).
                self.map.madvise(mmap.MADV_RANDOM)
        finally:
            os.close(fd)
        self.data = data
        metas = [self._meta(0, 4096)]
        psize = metas[0][0] if metas[0] is not None else 4096
        metas.append(self._meta(psize, psize))
        valid = [m for m in metas if m is not None]
        if not valid:
            raise StoreDamagedError(f"{data}: no valid LMDB meta page")
        self.psize, self.last, self.txnid, self.free, self.main = max(valid, key=lambda m: m[2])

    def _meta(self, offset: int, psize: int) -> tuple[int, int, int, TreeInfo, TreeInfo] | None:
        if self.map is None or len(self.map) < offset + _TXNID + 8:
            return None
        if struct.unpack_from("<I", self.map, offset + 16)[0] != _MAGIC:
            return None
        page_size = struct.unpack_from("<I", self.map, offset + _META_DBS)[0]  # the free db's md_pad
        last, txnid = struct.unpack_from("<QQ", self.map, offset + _LAST_PAGE)
        return page_size, last, txnid, TreeInfo.parse(self.map, offset + _META_DBS), TreeInfo.parse(self.map, offset + _META_DBS + DB_RECORD)

    def page(self, pgno: int) -> bytes:
        return self.map[pgno * self.psize : (pgno + 1) * self.psize]  # a copy: the map can close under an error

    def will_need(self, pgnos: list[int]) -> None:
        """Start the disk reads of the pages ``pgnos`` (those in use) together, before the walk
        reads them one by one: cold, each would otherwise wait for its own read."""
        if self.map is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        for pgno in pgnos:
            if 2 <= pgno <= self.last and (pgno + 1) * self.psize <= len(self.map):
                try:
                    self.map.madvise(mmap.MADV_WILLNEED, pgno * self.psize, self.psize)
                except OSError:
                    return  # a hint only: the walk reads the pages either way

    def close(self) -> None:
        if self.map is not None:
            self.map.close()


class _Walk:
    def __init__(self, pages: _Pages, db: str, budget: int | None, key_sizes: tuple[int, ...] = ()) -> None:
        self.pages, self.db, self.budget, self.key_sizes = pages, db, budget, key_sizes

    def fail(self, pgno: int, what: str) -> StoreDamagedError:
        return StoreDamagedError(
            f"{self.pages.data}: the store is damaged: page {pgno} of the {self.db} database {what}; "
            "LMDB's pages cannot be rebuilt: restore the store folder from a copy, or move it away"
        )

    def tree(self, info: TreeInfo, subdbs: dict[bytes, TreeInfo] | None = None) -> None:
        """Check the tree ``info``; leaves too unless it has more pages than the budget.
        ``subdbs``: filled with the sub-database records found in the leaves (the main db)."""
        if info.root == P_INVALID:
            return
        # Overflow pages count: checking a leaf reads the header of each record it names.
        whole = self.budget is None or info.branch_pages + info.leaf_pages + info.overflow_pages <= self.budget
        if not 1 <= info.depth <= 32:
            raise self.fail(info.root, f"is the root of a tree of impossible depth {info.depth}")
        self._page(info.root, 1, info.depth, whole, subdbs)

    def _page(self, pgno: int, level: int, depth: int, whole: bool, subdbs: dict[bytes, TreeInfo] | None) -> None:
        pages = self.pages
        if not 2 <= pgno <= pages.last:
            raise self.fail(pgno, f"is named but outside the pages in use (2..{pages.last})")
        page = pages.page(pgno)
        own, flags, lower, upper = struct.unpack_from("<QxxHHH", page, 0)
        if own != pgno:
            raise self.fail(pgno, f"holds page number {own} (a misplaced or overwritten page)")
        kind = flags & ~_IGNORED_FLAGS
        want = P_BRANCH if level < depth else P_LEAF
        if kind != want:
            raise self.fail(pgno, f"has page flags {flags:#x}, expected a {'branch' if want == P_BRANCH else 'leaf'} page")
        if not (PAGE_HEADER <= lower <= upper <= pages.psize) or (lower - PAGE_HEADER) % 2:
            raise self.fail(pgno, f"has free-space bounds {lower}..{upper} outside the page")
        count = (lower - PAGE_HEADER) // 2
        if count == 0 and want == P_BRANCH:
            raise self.fail(pgno, "is a branch page without children")
        offsets = struct.unpack_from(f"<{count}H", page, PAGE_HEADER)
        if want == P_LEAF or whole or level + 1 < depth:
            pages.will_need(self._next_pages(page, offsets, upper, want))
        for index, offset in enumerate(offsets):
            if not upper <= offset <= pages.psize - NODE_HEADER:
                raise self.fail(pgno, f"has a node offset {offset} outside its nodes ({upper}..{pages.psize})")
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, offset)
            if self.key_sizes and ksize not in self.key_sizes and not (want == P_BRANCH and index == 0):
                raise self.fail(pgno, f"has a key of {ksize} bytes where this database's keys have {self.key_sizes}")
            key_end = offset + NODE_HEADER + ksize
            if want == P_BRANCH:
                if key_end > pages.psize:
                    raise self.fail(pgno, f"has a node key of {ksize} bytes past the page's end")
                child = lo | hi << 16 | nflags << 32
                if whole or level + 1 < depth:
                    self._page(child, level + 1, depth, whole, subdbs)
                else:
                    self._bounds(child)
                continue
            dsize = lo | hi << 16
            inline = 8 if nflags & F_BIGDATA else dsize
            if key_end + inline > pages.psize:
                raise self.fail(pgno, f"has a node of {ksize} + {inline} bytes past the page's end")
            if nflags & F_BIGDATA:
                self._overflow(struct.unpack_from("<Q", page, key_end)[0], dsize)
            elif nflags & F_SUBDATA and subdbs is not None:
                if dsize != DB_RECORD:
                    raise self.fail(pgno, f"names a sub-database with a record of {dsize} bytes")
                subdbs[bytes(page[offset + NODE_HEADER : key_end])] = TreeInfo.parse(page, key_end)

    def _next_pages(self, page: bytes, offsets: tuple[int, ...], upper: int, want: int) -> list[int]:
        """The pages the walk reads next from ``page``: a branch page's children, a leaf's
        overflow pages. Unchecked (a hint only): nodes outside the page are skipped here and
        reported by the walk."""
        psize, found = self.pages.psize, []
        for offset in offsets:
            if not upper <= offset <= psize - NODE_HEADER:
                continue
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", page, offset)
            if want == P_BRANCH:
                found.append(lo | hi << 16 | nflags << 32)
            elif nflags & F_BIGDATA and offset + NODE_HEADER + ksize + 8 <= psize:
                found.append(struct.unpack_from("<Q", page, offset + NODE_HEADER + ksize)[0])
        return found

    def _bounds(self, pgno: int) -> None:
        if not 2 <= pgno <= self.pages.last:
            raise self.fail(pgno, f"is named but outside the pages in use (2..{self.pages.last})")

    def _overflow(self, pgno: int, nbytes: int) -> None:
        self._bounds(pgno)
        own, flags, count = struct.unpack_from("<QxxHI", self.pages.page(pgno), 0)
        if own != pgno or flags & ~_IGNORED_FLAGS != P_OVERFLOW:
            raise self.fail(pgno, f"is not the overflow page a record names (page number {own}, flags {flags:#x})")
        if count * self.pages.psize - PAGE_HEADER < nbytes or pgno + count - 1 > self.pages.last:
            raise self.fail(pgno, f"is an overflow run of {count} pages that cannot hold its {nbytes}-byte value")


def _check_once(data: Path, budget_pages: int | None) -> tuple[int, StoreDamagedError | None]:
    """The transaction id of the snapshot walked, and the first damage found (None: none)."""
    pages = _Pages(data)
    try:
        _Walk(pages, "free-page", budget_pages).tree(pages.free)
        subdbs: dict[bytes, TreeInfo] = {}
        _Walk(pages, "main", None).tree(pages.main, subdbs)
        for name, info in sorted(subdbs.items()):
            _Walk(pages, repr(name.decode(errors="replace")), budget_pages, KEY_SIZES.get(name, ())).tree(info)
        return pages.txnid, None
    except StoreDamagedError as error:
        return pages.txnid, error
    finally:
        pages.close()


def _txnid(data: Path) -> int:
    pages = _Pages(data)
    pages.close()
    return pages.txnid


def check_pages(data: Path, *, budget_pages: int | None = BUDGET_PAGES) -> None:
    """Check the B-tree pages of ``data.mdb`` (the free database, the main one, every named
    database in it); StoreDamagedError naming the page and database at the first damage.
    ``budget_pages`` None: every page of every tree (verify, repair).

    The walk is not an LMDB reader: a writer in another process may reuse the pages of an older
    snapshot while it runs. A writer never changes a page of the newest snapshot, so damage is
    reported only when no commit happened during the walk; otherwise the walk is done again."""
    for _ in range(8):
        txnid, damage = _check_once(data, budget_pages)
        if damage is None:
            return
        if _txnid(data) == txnid:
            raise damage
    raise damage
