"""Byte ranges of files read with Linux native AIO and O_DIRECT: a batch of reads in one submission.

Why: a batch of block records read through the page cache costs per record a
``posix_fadvise(WILLNEED)`` (the kernel allocates the pages and starts the read in the calling
thread: ~12 µs here) and a ``preadv`` (a wait, then a copy out of the page cache), each a
system call that drops and retakes the GIL; on 2 cores that, not the disk, bounded the tier's
cold reads (docs/store.md, "Segment files"). Here a batch is one ``io_submit`` of every
record's whole pages (O_DIRECT: no page cache) and a few ``io_getevents`` that wait for them
all, from the calling thread: no helper threads, no hand-off per record.

How: the kernel's AIO system calls through :mod:`ctypes` (``syscall(2)`` with the numbers of
x86-64 and arm64; a ctypes call releases the GIL while it waits). Each thread has its own AIO
context, request arrays and a page-aligned bounce buffer. A request is read as the whole pages
that hold it into the bounce buffer and handed back as a view of its bytes there; or, with an
``into`` (a raw record's payload, which the segment writer puts on a 512-byte boundary, going
to a 512-byte-aligned tensor row), as two buffers in one request: the 512-byte block before the
payload (the record's header at its end) into the bounce buffer, the payload straight into the
row, no copy. A request still in flight when the waiting is interrupted (an exception, a signal's
handler raising) is never left writing into a buffer that is reused: the context is destroyed,
which waits for its requests, and a new one is made at the next read.

Where AIO or O_DIRECT is missing (another OS or CPU, a filesystem such as tmpfs that refuses
O_DIRECT, ``io_setup`` refused by a sandbox or the system's ``aio-max-nr``), :func:`probe`
says so and the caller reads through the page cache instead.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffers (the bounce buffer's spans)
ALIGN = 512  # the smallest O_DIRECT alignment (a logical block): a Request's ``into``
DEPTH = 64  # requests one context holds in flight; a larger batch is read in rounds of this many
KEEP_BYTES = 64 << 20  # larger bounce buffers are not kept for the thread's life
# io_setup, io_destroy, io_submit, io_getevents
_SYSCALLS = {"x86_64": (206, 207, 209, 208), "amd64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4), "arm64": (0, 1, 2, 4)}
_IOCB_CMD_PREAD = 0
_IOCB_CMD_PREADV = 7


class _Iocb(ctypes.Structure):
    """``struct iocb`` of linux/aio_abi.h (64 bytes, little-endian field order)."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_uint32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _Iovec(ctypes.Structure):
    """``struct iovec``: a buffer's address and size."""

    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Event(ctypes.Structure):
    """``struct io_event``: the request's ``aio_data``, the iocb's address, the result (bytes or -errno)."""

    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


@dataclass(frozen=True, slots=True)
class Request:
    """``length`` bytes at byte ``offset`` of the file open (with O_DIRECT) as ``fd``. ``into``:
    where the range's last ``len(into)`` bytes go, straight from the disk (no copy), when they
    can (``into`` writable, its address and size and their place in the file multiples of
    :data:`ALIGN`, the bytes before them at most ``ALIGN``); else ignored."""

    fd: int
    offset: int
    length: int
    into: memoryview | None = None


def _syscall_numbers() -> tuple[int, int, int, int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return _SYSCALLS.get(platform.machine().lower())


class _Kernel:
    """The four AIO system calls; each returns the call's result or raises OSError."""

    def __init__(self, numbers: tuple[int, int, int, int]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self._setup, self._destroy, self._submit, self._getevents = numbers

    def _call(self, *args: object) -> int:
        result = self._syscall(*args)
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    def setup(self, depth: int) -> int:
        context = ctypes.c_ulong(0)
        self._call(self._setup, ctypes.c_long(depth), ctypes.byref(context))
        return context.value

    def destroy(self, context: int) -> None:
        self._call(self._destroy, ctypes.c_ulong(context))

    def submit(self, context: int, count: int, pointers: ctypes.Array) -> int:
        return self._call(self._submit, ctypes.c_ulong(context), ctypes.c_long(count), pointers)

    def getevents(self, context: int, least: int, most: int, events: ctypes.Array) -> int:
        while True:
            try:
                return self._call(self._getevents, ctypes.c_ulong(context), ctypes.c_long(least), ctypes.c_long(most), events, None)
            except InterruptedError:
                continue


class _ThreadState:
    """One thread's AIO context, request arrays and bounce buffer."""

    def __init__(self, kernel: _Kernel, depth: int) -> None:
        self.context = kernel.setup(depth)
        self.iocbs = (_Iocb * depth)()
        self.pointers = (ctypes.POINTER(_Iocb) * depth)(*(ctypes.pointer(iocb) for iocb in self.iocbs))
        self.events = (_Event * depth)()
        self.iovecs = (_Iovec * (2 * depth))()  # two per request read partly into its ``into``
        self.buffer: mmap.mmap | None = None
        self.address = 0

    def bounce(self, nbytes: int) -> tuple[mmap.mmap, int]:
        """A page-aligned buffer of at least ``nbytes`` and its address (kept for the next read
        unless larger than KEEP_BYTES)."""
        if self.buffer is not None and len(self.buffer) >= nbytes:
            return self.buffer, self.address
        # The old buffer is dropped, not closed: views of it from an earlier read may live on.
        buffer = mmap.mmap(-1, max(nbytes, 1 << 20))
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        if nbytes <= KEEP_BYTES:
            self.buffer, self.address = buffer, address
        return buffer, address


def _into_address(request: Request) -> int | None:
    """The address ``request.into`` is read to, or None where it cannot be (see :class:`Request`)."""
    into = request.into
    if into is None or into.readonly or not into.c_contiguous:
        return None
    tail = into.nbytes
    split = request.offset + request.length - tail
    if tail == 0 or tail % ALIGN or split % ALIGN or not 0 < split - request.offset <= ALIGN or split < ALIGN:
        return None
    address = ctypes.addressof(ctypes.c_char.from_buffer(into))
    return address if address % ALIGN == 0 else None


def _span(request: Request, into: int | None) -> tuple[int, int]:
    """What goes to the bounce buffer: (first byte, bytes) of the whole pages holding the request,
    or with ``into``, the one ALIGN-byte block before the part read into it."""
    if into is not None:
        return request.offset + request.length - request.into.nbytes - ALIGN, ALIGN  # type: ignore[union-attr]
    start = request.offset // PAGE * PAGE
    end = -(-(request.offset + request.length) // PAGE) * PAGE
    return start, end - start


class AioReader:
    """Reads batches of byte ranges (:class:`Request`) with Linux native AIO, all in flight together.

    ``read(requests)`` returns, per request, a memoryview of the bytes read (shorter than asked
    where the file ends first), valid until the same thread's next ``read``. The file
    descriptors must be open with O_DIRECT. OSError where the kernel refuses a request (EINVAL:
    O_DIRECT refused). ``reads`` counts requests, ``straight`` those read partly straight into
    their ``into``, ``submits`` io_submit calls.
    """

    def __init__(self, depth: int = DEPTH) -> None:
        numbers = _syscall_numbers()
        if numbers is None:
            raise OSError(errno.ENOSYS, f"Linux native AIO is not available on {sys.platform} {platform.machine()}")
        self.depth = depth
        self.reads = 0
        self.straight = 0  # requests whose ``into`` took its part straight from the disk
        self.submits = 0
        self._kernel = _Kernel(numbers)
        self._local = threading.local()
        self._states: dict[threading.Thread, _ThreadState] = {}  # the thread each context belongs to
        self._lock = threading.Lock()
        self._closed = False
        self._state()  # io_setup refused: raise here, at construction

    def _state(self) -> _ThreadState:
        if self._closed:
            raise ValueError("AioReader is closed")
        state = getattr(self._local, "state", None)
        if state is None:
            with self._lock:
                if self._closed:
                    raise ValueError("AioReader is closed")
                # Threads that ended left their contexts: destroyed now (a store outlives many threads).
                ended = [thread for thread in self._states if not thread.is_alive()]
                self._destroy_later([self._states.pop(thread) for thread in ended])
                state = _ThreadState(self._kernel, self.depth)
                self._states[threading.current_thread()] = state
            self._local.state = state
        return state

    def _destroy_later(self, states: list[_ThreadState]) -> None:
        """Destroy contexts none of whose requests are in flight, from a short-lived daemon thread:
        ``io_destroy`` waits for an RCU grace period (~30 ms here), which no caller should wait for
        (a process that exits first leaves them to the kernel)."""
        if states:
            kernel = self._kernel
            threading.Thread(target=lambda: [kernel.destroy(state.context) for state in states], name="hkv aio close",
                             daemon=True).start()  # fmt: skip

    def _drop(self, state: _ThreadState) -> None:
        """Destroy a thread's context (the kernel waits for its requests in flight)."""
        with self._lock:
            if self._states.get(threading.current_thread()) is state:
                del self._states[threading.current_thread()]
                self._kernel.destroy(state.context)
        self._local.state = None

    def read(self, requests: Sequence[Request]) -> list[memoryview]:
        """Per request a view of the bytes read (see the class docstring)."""
        out: list[memoryview] = [memoryview(b"")] * len(requests)

        def keep(i: int, view: memoryview) -> None:
            out[i] = view

        self.read_each(requests, keep)
        return out

    def read_each(self, requests: Sequence[Request], ready: Callable[[int, memoryview], object]) -> None:
        """Read ``requests``, calling ``ready(i, view)`` for each once it is read (in completion
        order, a round of up to ``depth`` requests at a time; the view valid until this thread's
        next read): the bytes read (shorter than asked where the file ends first), or, for a
        request whose ``into`` was used and read whole, the bytes before ``into``'s. A request
        the kernel fails raises OSError, and what ``ready`` raises propagates; either way no
        request is left in flight."""
        state = self._state()
        intos = [_into_address(request) for request in requests]
        spans = [_span(request, into) for request, into in zip(requests, intos)]
        starts = [0]
        for _, nbytes in spans:
            starts.append(starts[-1] + nbytes)
        buffer, base = state.bounce(starts[-1])
        view = memoryview(buffer)

        def finish(i: int, result: int) -> None:
            if result < 0:
                raise OSError(-result, os.strerror(-result))
            request = requests[i]
            skip = request.offset - spans[i][0]
            at = starts[i] + skip
            if intos[i] is None:
                ready(i, view[at : at + max(0, min(request.length, result - skip))])
            elif result == spans[i][1] + request.into.nbytes:  # type: ignore[union-attr]
                ready(i, view[at : starts[i] + spans[i][1]])
            else:  # the file ends early: what was read, in one piece
                head = view[at : starts[i] + min(spans[i][1], max(skip, result))]
                ready(i, memoryview(bytes(head) + bytes(request.into[: max(0, result - spans[i][1])])))  # type: ignore[index]

        try:
            for first in range(0, len(requests), self.depth):
                self._round(state, requests, intos, spans, starts, base, first, min(len(requests), first + self.depth), finish)
        except BaseException:
            self._drop(state)  # a request may still be in flight into the buffer
            raise
        self.reads += len(requests)
        self.straight += sum(into is not None for into in intos)

    def _round(self, state: _ThreadState, requests: Sequence[Request], intos: list[int | None], spans: list[tuple[int, int]],
               starts: list[int], base: int, first: int, last: int, finish: Callable[[int, int], None]) -> None:  # fmt: skip
        """Submit requests ``first .. last - 1`` and reap them, ``finish(i, result)`` for each."""
        count = last - first
        iovec_size = ctypes.sizeof(_Iovec)
        iovecs_at = ctypes.addressof(state.iovecs)
        for slot, i in enumerate(range(first, last)):
            iocb = state.iocbs[slot]
            start, nbytes = spans[i]
            iocb.aio_data = i
            iocb.aio_fildes = requests[i].fd
            iocb.aio_offset = start
            if intos[i] is None:
                iocb.aio_lio_opcode = _IOCB_CMD_PREAD
                iocb.aio_buf = base + starts[i]
                iocb.aio_nbytes = nbytes
            else:  # two buffers: the block before into's part (bounce), then into itself
                head, tail = state.iovecs[2 * slot], state.iovecs[2 * slot + 1]
                head.base, head.len = base + starts[i], nbytes
                tail.base, tail.len = intos[i], requests[i].into.nbytes  # type: ignore[union-attr]
                iocb.aio_lio_opcode = _IOCB_CMD_PREADV
                iocb.aio_buf = iovecs_at + 2 * slot * iovec_size
                iocb.aio_nbytes = 2
        submitted = reaped = 0
        while reaped < count:
            if submitted < count:
                try:
                    pointers = ctypes.cast(ctypes.byref(state.pointers, submitted * ctypes.sizeof(ctypes.c_void_p)),
                                           ctypes.POINTER(ctypes.POINTER(_Iocb)))  # fmt: skip
                    submitted += self._kernel.submit(state.context, count - submitted, pointers)  # type: ignore[arg-type]
                    self.submits += 1
                    continue
                except BlockingIOError:  # the context is full: reap, then submit the rest
                    if submitted == reaped:
                        raise
            # All of the round at once (reaping each as it came took more CPU for the same speed, measured),
            # unless the context was full before everything was submitted.
            least = 1 if submitted < count else submitted - reaped
            got = self._kernel.getevents(state.context, least, submitted - reaped, state.events)
            for event in state.events[:got]:
                finish(event.data, event.res)
            reaped += got

    def close(self) -> None:
        """Destroy every thread's context (no read may be running, so none has a request in flight)."""
        with self._lock:
            states, self._states, self._closed = list(self._states.values()), {}, True
        self._destroy_later(states)


def probe(depth: int = DEPTH) -> AioReader | None:
    """An :class:`AioReader`, or None where Linux native AIO is not to be had here."""
    try:
        return AioReader(depth)
    except (OSError, AttributeError):
        return None
