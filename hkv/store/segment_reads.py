"""Reading block records from segment files (:class:`SegmentReader`), a batch at a time.

See :mod:`.segments` for the files and docs/store.md ("Segment files") for what was measured.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .linux_aio import AioReader, Request, probe
from .segments import PAGE, Place, ThreadBuffers, segment_path

_SWEEP_EVERY = 256  # batches between checks for segment files deleted meanwhile


class SegmentReader:
    """Reads records from the segment files of the store folder ``folder``, a batch at a time.

    With ``aio`` (and where Linux native AIO and O_DIRECT work: :mod:`.linux_aio`),
    :meth:`read_each` reads a batch's records in one submission, every record's pages in flight
    together, bypassing the page cache. Otherwise (and for single records) with positional reads
    through the page cache: :meth:`hint` first asks the kernel for every record of the batch
    (``posix_fadvise(WILLNEED)``: its disk reads start at once), then :meth:`read_split` reads
    each, a raw record straight into its destination. Both against the alternatives measured:
    docs/store.md ("Segment files"). Descriptors are kept per segment (``fadvise(RANDOM)``: no
    read-ahead beyond a record); one of a file compaction deleted is dropped at the next sweep."""

    def __init__(self, folder: Path, *, aio: bool = True) -> None:
        self.folder = Path(folder)
        self._fds: dict[int, int] = {}
        self._direct_fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._buffers = ThreadBuffers()
        self._reads = 0
        self.aio: AioReader | None = probe() if aio else None
        self._retired: list[AioReader] = []  # readers given up (O_DIRECT refused), closed with the store

    def _fd(self, segment: int) -> int:
        """The descriptor of a segment; FileNotFoundError if it is gone."""
        with self._lock:
            fd = self._fds.get(segment)
            if fd is None:
                fd = os.open(segment_path(self.folder, segment), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[segment] = fd
            return fd

    def _direct_fd(self, segment: int) -> int | None:
        """The O_DIRECT descriptor of a segment; None where the filesystem refuses O_DIRECT;
        FileNotFoundError if the file is gone."""
        with self._lock:
            fd = self._direct_fds.get(segment)
            if fd is None:
                try:
                    fd = os.open(segment_path(self.folder, segment), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECT)
                except OSError as error:
                    if error.errno != errno.EINVAL:
                        raise
                    return None
                self._direct_fds[segment] = fd
            return fd

    def forget(self, segment: int) -> None:
        """Close the descriptors of ``segment`` (deleted: its disk space is freed when no one has it open)."""
        with self._lock:
            fds = [fd for fd in (self._fds.pop(segment, None), self._direct_fds.pop(segment, None)) if fd is not None]
        for fd in fds:
            os.close(fd)

    def sweep(self) -> None:
        """Close the descriptors of segment files deleted meanwhile (by any process)."""
        with self._lock:
            held = {**self._direct_fds, **self._fds}
            gone = [segment for segment, fd in held.items() if os.fstat(fd).st_nlink == 0]
        for segment in gone:
            self.forget(segment)

    def _count_batch(self) -> None:
        self._reads += 1
        if self._reads % _SWEEP_EVERY == 0:
            self.sweep()

    def read_each(self, places: Sequence[Place], ready: Callable[[int, memoryview | None], object],
                  into: Sequence[memoryview | None] | None = None) -> bool:  # fmt: skip
        """Read every record of ``places`` at once (Linux native AIO, O_DIRECT), calling
        ``ready(i, view)`` for each once it is read (the view shorter than ``place.length``: the
        file ends early; None: its segment file is gone); the view is valid until this thread's
        next read. ``into[i]``: where record ``i``'s payload may go straight from the disk (a
        raw record's, 512-byte aligned in the file: :func:`~.segments.record_shift`); where it
        went, ``view`` is the record's header alone (``len(view) < place.length`` with the
        payload in ``into[i]``; see :class:`~.linux_aio.Request`). False (nothing read) where
        batch reads are not to be had here: then :meth:`hint` and :meth:`read_split`."""
        aio = self.aio
        if aio is None:
            return False
        self._count_batch()
        requests: list[Request] = []
        read: list[int] = []
        gone: list[int] = []
        for i, place in enumerate(places):
            try:
                fd = self._direct_fd(place.segment)
            except FileNotFoundError:
                gone.append(i)
                continue
            if fd is None:
                self._give_up_aio(aio)
                return False
            requests.append(Request(fd, place.offset, place.length, into[i] if into is not None else None))
            read.append(i)
        delivered = 0

        def deliver(j: int, view: memoryview) -> None:
            nonlocal delivered
            delivered += 1
            ready(read[j], view)

        try:
            aio.read_each(requests, deliver)
        except OSError as error:
            if delivered or error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EAGAIN):
                raise
            if error.errno != errno.EAGAIN:
                self._give_up_aio(aio)  # the filesystem refused an O_DIRECT read it had opened
            # EAGAIN: a new thread's io_setup over the system's aio-max-nr: this batch through the page cache
            return False
        for i in gone:
            ready(i, None)
        return True

    def _give_up_aio(self, aio: AioReader) -> None:
        with self._lock:
            if self.aio is aio:
                self.aio = None
                self._retired.append(aio)

    def hint(self, places: Sequence[Place]) -> None:
        """Start the disk reads of every record of ``places`` (a missing file is skipped here and
        met by the read)."""
        self._count_batch()
        for segment, start, end in _page_runs(places):
            try:
                os.posix_fadvise(self._fd(segment), start, end - start, os.POSIX_FADV_WILLNEED)
            except FileNotFoundError:
                pass

    def read(self, place: Place, use: Callable[[memoryview], object]) -> object:
        """Read the record at ``place`` and return ``use(view)``, the view valid only during the
        call (a per-thread buffer). A view shorter than ``place.length``: the file ends early.
        FileNotFoundError if the segment file is gone."""
        fd = self._fd(place.segment)
        view = memoryview(self._buffers.get(place.length))[: place.length]
        got = os.preadv(fd, [view], place.offset)
        return use(view[:got])

    def read_split(self, place: Place, head: memoryview, rest: memoryview) -> int:
        """Read the record at ``place`` into ``head`` (its first bytes) and ``rest`` (the others,
        ``len(head) + len(rest) == place.length``); the bytes read (fewer: the file ends early)."""
        return os.preadv(self._fd(place.segment), [head, rest], place.offset)

    def close(self) -> None:
        with self._lock:
            fds = [*self._fds.values(), *self._direct_fds.values()]
            self._fds, self._direct_fds = {}, {}
            readers = [reader for reader in (self.aio, *self._retired) if reader is not None]
            self.aio, self._retired = None, []
        for fd in fds:
            os.close(fd)
        for reader in readers:
            reader.close()


def _page_runs(places: Sequence[Place]) -> list[tuple[int, int, int]]:
    """``(segment, start, end)`` byte ranges covering ``places``, records whose pages touch or
    overlap merged into one range (one system call each, never a page more than the records')."""
    runs: list[list[int]] = []
    for place in sorted(places, key=lambda p: (p.segment, p.offset)):
        end = place.offset + place.length
        last = runs[-1] if runs else None
        if last is not None and last[0] == place.segment and place.offset // PAGE <= (last[2] + PAGE - 1) // PAGE:
            last[2] = max(last[2], end)
        else:
            runs.append([place.segment, place.offset, end])
    return [(segment, start, end) for segment, start, end in runs]
