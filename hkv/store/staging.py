"""Page-aligned buffers for the records of write submissions, reused (:class:`StagingBuffers`).

Why: a submission's records are built in place in one page-aligned buffer that the segment
writer writes with O_DIRECT as it is (:mod:`.segments`); a fresh anonymous buffer costs the
kernel zeroing its pages, measured at about 1 GB/s on this VM, slower than the disk, so buffers
are given back when their job is done and used again.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Sequence

from .segments import PAGE, record_starts, round_up


class StagingBuffers:
    """Page-aligned buffers for the records of write submissions, reused: a fresh buffer costs
    the kernel zeroing its pages (about 1 GB/s here, slower than the disk), a reused one nothing.
    At most ``limit_bytes`` are handed out at once: :meth:`take` waits for the writer to give
    buffers back (bounded memory for queued writes), except that one submission larger than the
    limit always gets its buffer when nothing else is out."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._free: list[mmap.mmap] = []
        self._out = 0  # bytes handed out
        self._cond = threading.Condition()

    def take(self, sizes: Sequence[int]) -> tuple[memoryview, list[memoryview], Callable[[], None]]:
        """A buffer for records of ``sizes`` bytes packed end to end (but for
        :func:`~.segments.record_shift`'s padding, zeroed), zero after them up to its page; a view of each record's place (the caller fills them); and the call that gives
        the buffer back (once nothing reads it any more: the job's future is done)."""
        starts, total = record_starts(sizes)  # packed, but for the padding that puts a raw payload on 512 bytes
        ends = [start + size for start, size in zip(starts, sizes)]
        gaps = [(end, start) for end, start in zip([0, *ends], starts) if start > end]
        need = max(round_up(total), PAGE)
        with self._cond:
            while self._out and self._out + need > self.limit_bytes:
                self._cond.wait()
            fits = [b for b in self._free if len(b) >= need]
            raw = min(fits, key=len) if fits else None
            if raw is not None:
                self._free.remove(raw)
            self._out += need
        if raw is None:
            # MAP_POPULATE: the pages are made in one call, not faulted in 4 KiB at a time
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            raw = mmap.mmap(-1, need, flags=flags)
        buffer = memoryview(raw)[:need]
        for first, last in gaps + [(total, need)]:  # a reused buffer's old bytes never reach the disk
            buffer[first:last] = bytes(last - first)
        views = [buffer[at : at + size] for at, size in zip(starts, sizes)]

        def give_back() -> None:
            with self._cond:
                self._out -= need
                if sum(len(b) for b in self._free) + len(raw) <= self.limit_bytes:
                    self._free.append(raw)
                self._cond.notify_all()

        return buffer, views, give_back
