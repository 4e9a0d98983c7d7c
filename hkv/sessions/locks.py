"""Writer locks of sessions: POSIX byte-range locks on one lock file per store.

``<store>/sessions.lock`` (a fixed name: a session name never becomes a path) holds, for each
session open for writing, an exclusive ``fcntl.lockf`` lock of one byte at offset
``xxh3_64(name) & (2**62 - 1)``. The kernel drops a process's locks when it dies, so kill -9
leaves no stale lock.

POSIX locks belong to a process, not to a file descriptor: they never conflict within one
process, and closing *any* descriptor of the file drops *all* of the process's locks on it. So
this module keeps one descriptor per lock file for the whole process, never closed while a lock
is held, and a set of the names this process holds (a second open here is refused from it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

import xxhash

from ..errors import StoreError

LOCK_FILE = "sessions.lock"
_OFFSET_MASK = 2**62 - 1


def lock_offset(name: str) -> int:
    """Byte of the lock file that stands for session ``name``."""
    return xxhash.xxh3_64_intdigest(name.encode()) & _OFFSET_MASK


class LockFile:
    """The process-wide state of one store's lock file: its descriptor and the names held."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.writable = False
        self.held: set[str] = set()
        self.mutex = threading.Lock()

    def _open(self, write: bool) -> int | None:
        """The descriptor (opened for writing if ``write``); None if the file does not exist and
        cannot be created."""
        if self.fd is not None and (self.writable or not write):
            return self.fd
        if self.fd is not None:  # read-only descriptor, no lock held through it: safe to close
            os.close(self.fd)
            self.fd = None
        try:  # O_NOFOLLOW: a link planted in the store never makes hkv create or write its target
            self.fd, self.writable = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), True
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise StoreError(f"{self.path} is a symbolic link; hkv follows no link inside a store") from None
            if write or not self.path.exists():
                raise
            self.fd, self.writable = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW), False
        return self.fd

    def acquire(self, name: str) -> bool:
        """Take ``name``'s lock; False if this process or another holds it."""
        with self.mutex:
            if name in self.held:
                return False
            fd = self._open(write=True)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, lock_offset(name))
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EAGAIN):
                    return False
                raise
            self.held.add(name)
            return True

    def release(self, name: str) -> None:
        with self.mutex:
            if name in self.held:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, lock_offset(name))
                self.held.discard(name)

    def is_locked(self, name: str) -> bool:
        """Whether this process or another holds ``name``'s lock (probes with a shared lock,
        released at once; takes nothing when the lock file does not exist)."""
        with self.mutex:
            if name in self.held:
                return True
            if self.fd is None and not self.path.exists():
                return False
            fd = self._open(write=False)
            offset = lock_offset(name)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, offset)
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EAGAIN):
                    return True
                raise
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)
            return False


_registry: dict[str, LockFile] = {}
_registry_lock = threading.Lock()


def lock_file(store: Path) -> LockFile:
    """The process-wide :class:`LockFile` of the store folder ``store``."""
    path = Path(os.path.realpath(store)) / LOCK_FILE
    with _registry_lock:
        found = _registry.get(str(path))
        if found is None:
            found = _registry[str(path)] = LockFile(path)
        return found


class SessionLock:
    """A held writer lock; ``release()`` (idempotent) or use as a context manager."""

    def __init__(self, locks: LockFile, name: str) -> None:
        self._locks, self.name = locks, name
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._locks.release(self.name)

    def __enter__(self) -> SessionLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
