"""The store's writer thread: batched, durable LMDB write transactions.

One thread per store takes :class:`WriteJob` submissions from a queue, groups those waiting into
one transaction of up to ``max_blocks`` blocks (group commit: a deep queue means fewer, larger
commits; a lone put is committed at once) and resolves each job's future once its transaction
is durable. The environment is opened with ``sync=True, metasync=False``: a commit fdatasyncs
its data pages but not its meta page; the next commit's fdatasync flushes that meta page, and
when the queue runs dry an explicit ``env.sync`` does. Futures resolve only after that, so an
acknowledged write survives kill -9 and power loss, at one fsync per commit instead of two.

What a transaction does is the owner's ``apply`` callback; this module only schedules. A job
that only frees space (``frees``: deletes) is never failed by the puts beside it: when a batch
fails, each job is tried alone, and a freeing job that failed for want of disk space runs once
more after the owner's ``make_room`` (the store's reserve file, :mod:`.space`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import lmdb

from ..errors import TierError
from ..threads import serial_thread


class WriteJob:
    """One submission, done in one transaction, and its future: records to put and / or keys to
    delete, or ``apply``, any work on the store's write transaction (the owner passes it its view
    of the transaction; what it returns is the future's result, what it raises the future's
    exception). ``apply`` must depend only on what it reads in the transaction: a job may be run
    again in a fresh transaction after a full map or disk. ``frees``: the job deletes more than
    it writes (deletes alone always do)."""

    __slots__ = ("puts", "deletes", "apply", "frees", "future", "places", "freed", "staged", "release_staged")

    def __init__(
        self, puts: list[tuple[bytes, bytearray]] | None = None, deletes: list[bytes] | None = None,
        apply: Callable[[object], object] | None = None, frees: bool = False,
    ) -> None:  # fmt: skip
        self.puts, self.deletes, self.apply = puts or [], deletes or [], apply
        self.frees = frees and not self.puts
        self.future: Future = Future()
        self.places: list | None = None  # where the owner wrote ``puts`` outside the transaction (kept for a retry)
        self.freed: list = []  # what the owner may reclaim once the job's transaction is durable (``on_durable``)
        self.staged: memoryview | None = None  # a page-aligned buffer holding ``puts``' records packed (the owner's)
        # Gives ``staged`` back to its owner (at most once): called once the records are durable at
        # ``places`` (only their lengths are read after that), and when the future is done.
        self.release_staged: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        """Blocks this job touches (an ``apply`` job counts as one)."""
        return len(self.puts) + len(self.deletes) + (self.apply is not None)


Outcome = tuple[WriteJob, object]  # the job and its result, or the exception to raise


class BatchWriter:
    """Owns the writer thread of one LMDB environment; :meth:`close` joins it.

    ``apply(jobs)`` runs in the writer thread: it does the jobs in one write transaction and
    returns one result (or exception instance) per job; raising ``lmdb.MapFullError`` makes the
    writer retry each job alone (after ``touch()``, a tiny commit). ``failed(job, error)`` is the
    exception a job whose transaction raised ``error`` gets (``job`` None: a sync failed).
    ``make_room(error)``: called when a freeing job failed; True if it freed disk space (the
    job is then tried once more). ``on_durable(jobs)``: called in the writer thread with the
    jobs whose transaction is durable, before their futures resolve. ``prepare(jobs)``: work on
    the jobs before their transaction (the store writes their records to its segment file), in a
    thread of its own, a batch at a time, in submission order, so that it overlaps the commit of
    the batch before; what it leaves undone (it raised) ``apply`` must do.
    """

    def __init__(
        self,
        env: lmdb.Environment,
        apply: Callable[[list[WriteJob]], list[object]],
        failed: Callable[[WriteJob | None, BaseException], BaseException],
        *,
        max_blocks: int,
        name: str,
        touch: Callable[[], None],
        make_room: Callable[[BaseException], bool] = lambda error: False,
        on_durable: Callable[[list[WriteJob]], None] = lambda jobs: None,
        prepare: Callable[[list[WriteJob]], None] | None = None,
    ) -> None:
        self._env, self._apply, self._failed, self._touch, self._make_room = env, apply, failed, touch, make_room
        self._on_durable, self._prepare = on_durable, prepare
        self.max_blocks, self.name = max_blocks, name
        self._jobs: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue()
        # With ``prepare``, jobs go through a second thread first (submission order kept): it
        # prepares a batch (writes the records of its puts) while this one commits the last.
        self._ready: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue() if prepare is not None else self._jobs
        self._lock = threading.Lock()  # orders submissions against closing
        self._closing = False  # set by close() or when the thread ends: no more submissions
        self._prep_thread = None
        if prepare is not None:
            self._prep_thread = serial_thread(self._prep_loop, name=f"{name} (prepare)")
            self._prep_thread.start()
        self._thread = serial_thread(self._loop, name=name)
        self._thread.start()

    def submit(self, job: WriteJob) -> Future:
        """Queue ``job``; raises TierError once the writer is closing or its thread has ended."""
        with self._lock:
            if self._closing:
                raise TierError(f"{self.name}: the writer is closed (closing, or its thread ended)")
            self._jobs.put(job)
        return job.future

    def close(self) -> None:
        """Finish every job submitted so far, then stop and join the thread."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._jobs.put(None)  # after every job already queued; none can follow
        if self._thread is not threading.current_thread():
            if self._prep_thread is not None:
                self._prep_thread.join()
            self._thread.join()
            self._fail_stranded([])  # what the prepare thread passed on after the writer stopped

    def _prep_loop(self) -> None:
        """Take submissions in order, ``prepare`` them a batch at a time, pass them on."""
        while True:
            job = self._jobs.get()
            batch, count = [job], 0 if job is None else job.size
            while job is not None and count < self.max_blocks:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                count += 0 if job is None else job.size
            jobs = [job for job in batch if job is not None]
            if jobs:
                try:
                    self._prepare(jobs)
                except Exception:  # the owner's ``apply`` meets it again, and reports it
                    pass
            for job in batch:
                self._ready.put(job)
                if job is None:
                    return

    def _loop(self) -> None:
        durable: list[Outcome] = []  # committed; resolved once a later fsync covers their meta page
        batch: list[WriteJob] = []
        try:
            self._run(durable, batch)
        finally:  # normal stop or a crash: no job may be left waiting forever
            with self._lock:
                self._closing = True
            self._fail_stranded([job for job, _ in durable] + batch)
            if self._prep_thread is not None:
                self._jobs.put(None)  # the prepare thread stops too (a crash left it waiting)

    def _fail_stranded(self, stranded: list[WriteJob]) -> None:
        """Fail ``stranded`` and every job still queued (the writer has stopped)."""
        for source in {id(q): q for q in (self._jobs, self._ready)}.values():
            while True:
                try:
                    job = source.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    stranded.append(job)
        for job in stranded:
            if not job.future.done():
                job.future.set_exception(TierError(f"{self.name}: the writer stopped before this job was done"))

    def _run(self, durable: list[Outcome], batch: list[WriteJob]) -> None:
        while True:
            if durable:
                try:
                    job = self._ready.get_nowait()
                except queue.Empty:  # idle: make the last commit durable now (one small fdatasync)
                    self._sync(durable)
                    job = self._ready.get()
            else:
                job = self._ready.get()
            if job is None:
                self._sync(durable)
                return
            batch[:], count = [job], job.size
            while count < self.max_blocks:  # gather what is already waiting, up to a batch
                try:
                    job = self._ready.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._ready.put(None)  # stop after this batch
                    break
                batch.append(job)
                count += job.size
            committed = self._commit([job for job in batch if job.future.set_running_or_notify_cancel()])
            self._resolve(durable)  # this commit's fdatasync also flushed the previous meta page
            durable[:] = committed
            batch.clear()

    def _commit(self, batch: list[WriteJob], retry: bool = True) -> list[Outcome]:
        """Do ``batch`` in one transaction; on a full map, commit one small transaction (LMDB
        reuses the pages freed by transaction N only from N + 2 on, so fresh deletes may not be
        reusable yet) and retry each job alone. On another failure (a full disk), a batch with a
        freeing job is retried job by job, and a freeing job alone once more after
        ``make_room``."""
        try:
            return list(zip(batch, self._apply(batch)))
        except lmdb.MapFullError as error:
            if retry:
                self._touch()
                return [done for job in batch for done in self._commit([job], retry=False)]
            return [(job, self._failed(job, error)) for job in batch]
        except Exception as error:  # the writer must survive; the callers see the failure
            if retry and len(batch) > 1 and any(job.frees for job in batch):
                return [done for job in batch for done in self._commit([job])]
            if retry and len(batch) == 1 and batch[0].frees and self._make_room(error):
                return self._commit(batch, retry=False)
            return [(job, self._failed(job, error)) for job in batch]

    def _sync(self, done: list[Outcome]) -> None:
        if not done:
            return
        try:
            self._env.sync(True)
        except lmdb.Error as error:
            done[:] = [(job, self._failed(None, error)) for job, _ in done]
        self._resolve(done)

    def _resolve(self, done: list[Outcome]) -> None:
        """Resolve the futures of ``done``, whose transactions are durable now."""
        self._on_durable([job for job, result in done if not isinstance(result, BaseException)])
        for job, result in done:
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        done.clear()
