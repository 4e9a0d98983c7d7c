"""The store folder's files, checked before LMDB maps them.

LMDB maps ``data.mdb`` and trusts it: a file shorter than the pages its meta page names makes
the first read of a missing page a SIGBUS, and LMDB follows links, so a ``lock.mdb`` link would
have its target overwritten with the lock table. :func:`check_store_files` runs before every
open: the files the store opens must be regular files inside the folder (``lstat``, no link
followed; ``segments`` a folder), ``data.mdb`` must hold every page its newer meta page says is in use, and its B-tree
pages must be sound (:mod:`.pages`).

Meta page layout (LMDB 0.9, 64-bit; ``mdb.c``: ``MDB_page`` header, then ``MDB_meta``): magic
u32 at byte 16, the free database's ``md_pad`` (the page size) at 40, ``mm_last_pg`` u64 at
136, ``mm_txnid`` u64 at 144; meta 0 in page 0, meta 1 in page 1. LMDB uses the meta with the
larger transaction id.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from ..errors import StoreDamagedError, StoreError
from .pages import check_pages

DATA_FILE = "data.mdb"
SEGMENT_DIR = "segments"  # the block records of store format 3 (hkv.store.segments)
USERS_LOCK = "users.lock"
LOCK_FILES = ("lock.mdb", "sessions.lock", USERS_LOCK, "reserve")
MAGIC = 0xBEEFC0DE
_MAGIC_AT, _PSIZE_AT, _LAST_PAGE_AT, _TXNID_AT = 16, 40, 136, 144
_MIN_PAGE = 512  # the smallest page size a meta page may name before it is taken as garbage
_HOW = "move the folder away (or restore it from a copy) and let hkv create a new store there"


def _regular_or_absent(path: Path) -> bool:
    """Whether ``path`` exists; StoreError if it is a link or not a regular file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise StoreError(f"{path} is a symbolic link; hkv follows no link inside a store ({_HOW})")
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{path} is not a regular file; {_HOW}")
    return True


def _meta(page: bytes) -> tuple[int, int, int] | None:
    """``(page size, last page, txnid)`` of one meta page, None if its magic is wrong."""
    if len(page) < _TXNID_AT + 8 or struct.unpack_from("<I", page, _MAGIC_AT)[0] != MAGIC:
        return None
    psize = struct.unpack_from("<I", page, _PSIZE_AT)[0]
    last, txnid = struct.unpack_from("<QQ", page, _LAST_PAGE_AT)
    return psize, last, txnid


def needed_bytes(data: Path) -> tuple[int, int]:
    """``(bytes the newer meta page says data.mdb holds, the file's size)``; StoreError naming
    the file when neither meta page is LMDB's."""
    fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        first = _meta(os.pread(fd, _TXNID_AT + 8, 0))
        psize = first[0] if first is not None and first[0] >= _MIN_PAGE else 4096
        second = _meta(os.pread(fd, _TXNID_AT + 8, psize))
    finally:
        os.close(fd)
    metas = [m for m in (first, second) if m is not None and m[0] >= _MIN_PAGE]
    if not metas:
        if size == 0:
            raise StoreDamagedError(f"{data} is empty (truncated to 0 bytes): its sessions are lost; {_HOW}")
        raise StoreDamagedError(f"{data} has no valid LMDB meta page (damaged, or not an LMDB file); {_HOW}")
    psize, last, _ = max(metas, key=lambda m: m[2])
    return (last + 1) * psize, size


def check_store_files(folder: Path) -> bool:
    """Check the files of the store ``folder`` (which must exist); returns whether ``data.mdb``
    exists. StoreError naming the file for a link, a non-regular file, or a ``data.mdb`` shorter
    than its pages in use (truncated: reading it would crash the process)."""
    for name in LOCK_FILES:
        _regular_or_absent(folder / name)
    try:
        segments = os.lstat(folder / SEGMENT_DIR)
    except FileNotFoundError:
        segments = None
    if segments is not None and not stat.S_ISDIR(segments.st_mode):  # a link too: lstat does not follow it
        raise StoreError(f"{folder / SEGMENT_DIR} is not a folder (a link, or a file); hkv follows no link inside a store ({_HOW})")
    data = folder / DATA_FILE
    if not _regular_or_absent(data):
        return False
    need, size = needed_bytes(data)
    if size < need:
        raise StoreDamagedError(
            f"{data} is truncated: {size} bytes, but LMDB's meta page says {need} bytes are in use "
            f"(a copy cut short, or a full disk); {_HOW}"
        )
    check_pages(data)  # LMDB would crash on a damaged page: StoreDamagedError first
    return True


@contextlib.contextmanager
def creating(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the store folder itself while it is checked, opened and, if new,
    initialised: processes creating one store at once take turns, so none sees another's
    half-written first pages. (A lock on the folder, not on a file in it: closing another
    descriptor of ``sessions.lock`` would drop this process's session locks.)"""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the flock


def hold_store(folder: Path, *, exclusive: bool) -> int:
    """Take the store's users lock (``flock`` on ``users.lock``) and return its descriptor, to
    be closed when the store is: shared for every writable open, exclusive for the maintenance
    that deletes what another writer may be about to use (``hkv sessions gc`` / ``repair``).
    Never waits: StoreError saying who holds it."""
    try:
        fd = os.open(folder / USERS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise StoreError(f"{folder / USERS_LOCK}: cannot open the store's users lock: {error.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if exclusive:
            raise StoreError(
                f"{folder} is open for writing in another process (a running model, `hkv chat`, ...); "
                "this command needs the store alone: close that process first"
            ) from None
        raise StoreError(f"{folder} is being repaired or collected (`hkv sessions repair` / `gc`); try again when it is done") from None
    return fd


def filesystem_bytes(path: Path) -> int:
    """Total bytes of the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    info = os.statvfs(probe)
    return info.f_blocks * info.f_frsize
