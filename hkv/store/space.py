"""Disk space of a store: a reserve file that a full disk gives back to deletes, and write
errors named by what caused them.

LMDB never shrinks ``data.mdb``, and every transaction, a delete too, writes its changed pages
to fresh ones (copy on write): on a full filesystem, deleting a session needs space to happen.
So a writable store keeps ``reserve``, a preallocated file of :func:`reserve_bytes` (1/64 of
the disk budget, 1-64 MiB). A transaction that only frees space (a session delete, a reclaim,
``hkv sessions gc`` / ``repair``) and fails for want of space deletes the reserve and runs again;
puts never use it. The store recreates the reserve when it opens and after each freeing
commit, once the filesystem has room again.

A failed write is named by its cause: the filesystem's free space is read at once, and a write
that fails with ``ENOSPC``, or with ``EIO`` while the filesystem is nearly full (LMDB turns a
short write into ``EIO``), is a :class:`~hkv.errors.DiskFullError` naming the store's path,
the bytes free and what frees space; any other ``EIO`` an I/O error naming the path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import DiskFullError, StoreError

RESERVE_FILE = "reserve"
_MIN_RESERVE, _MAX_RESERVE = 1 << 20, 64 << 20
# A write failing with EIO counts as a full disk when the filesystem has less than this free
# (bytes): a transaction's pages, or a batch of records, no longer fit.
_NEARLY_FULL = 64 << 20
FREE_SPACE_HOW = (
    "free space: `hkv sessions rm NAME` deletes a session, `hkv sessions gc` the blocks no session "
    "references; or move tiers.path to a larger disk"
)


def reserve_bytes(capacity_bytes: int) -> int:
    """Size of the reserve file for a disk budget of ``capacity_bytes`` (bytes)."""
    return max(_MIN_RESERVE, min(_MAX_RESERVE, capacity_bytes // 64))


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still allocate on the filesystem holding ``path``."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


class SpaceReserve:
    """The reserve file of the store folder ``folder``: ``nbytes`` preallocated bytes."""

    def __init__(self, folder: Path, nbytes: int) -> None:
        self.path, self.nbytes = folder / RESERVE_FILE, nbytes

    def present(self) -> bool:
        try:
            return os.lstat(self.path).st_size >= self.nbytes
        except FileNotFoundError:
            return False

    def ensure(self) -> bool:
        """Create the reserve (allocated, not sparse) if it is missing or short; False when the
        filesystem has no room for it now (nothing is left behind then). StoreError for a link."""
        if self.present():
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise StoreError(f"{self.path} is a symbolic link; hkv follows no link inside a store") from None
            return False
        try:
            os.posix_fallocate(fd, 0, self.nbytes)
            os.fsync(fd)
            return True
        except OSError:
            os.ftruncate(fd, 0)  # a half-allocated reserve would pass for one
            return False
        finally:
            os.close(fd)

    def release(self) -> int:
        """Delete the reserve; the bytes it gave back (0 if there was none)."""
        try:
            size = os.lstat(self.path).st_size
            os.unlink(self.path)
        except FileNotFoundError:
            return 0
        return size


def out_of_space(path: Path, error: BaseException) -> bool:
    """Whether ``error`` (raised writing the store at ``path``) means the filesystem is full."""
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in text:
        return True
    if (isinstance(error, OSError) and error.errno == errno.EIO) or "Input/output error" in text:
        try:
            return free_bytes(path) < _NEARLY_FULL
        except OSError:
            return False
    return False


def write_error(path: Path, error: BaseException, what: str) -> StoreError:
    """The error a failed write of ``what`` to the store at ``path`` is reported as."""
    if out_of_space(path, error):
        try:
            free = f"{free_bytes(path)} bytes free"
        except OSError:
            free = "free space unknown"
        return DiskFullError(f"{path}: the disk is full ({free} on its filesystem): cannot write {what}; {FREE_SPACE_HOW}")
    return StoreError(f"{path}: writing {what} failed: {error} (an I/O error: check the disk and the kernel log)")
