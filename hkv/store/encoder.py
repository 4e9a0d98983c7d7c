"""Encoding a lossy store's blocks off the caller's thread, in submission order
(:meth:`hkv.store.block_store.BlockStore.submit_put_later`).

Encoding an int4 block costs ~80 µs of CPU (a 48 KiB fp16 SmolLM2 block, one thread); a tier manager that
writes host blocks to disk under its lock would hold every gather up for that long per block.
One thread encodes instead, and hands the records to the store's writer in the order they were
submitted; every other write of the store first waits until the encodes queued before it have
reached the writer, so no delete, commit or flush overtakes a put submitted earlier.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ..threads import serial_torch


class OrderedEncoder:
    """One background thread running ``submit``'s jobs in order; :meth:`drain` waits for the queued ones."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None
        self._lock = threading.Lock()

    def submit(self, encode_and_queue: Callable[[], Future[None]]) -> Future[None]:
        """Run ``encode_and_queue`` (which encodes and submits the records to the writer,
        returning the writer's future) on the thread; a future that resolves as the writer's
        does, or with what ``encode_and_queue`` raised."""
        outcome: Future[None] = Future()

        def job() -> None:
            try:
                written = encode_and_queue()
            except BaseException as error:  # noqa: BLE001 -- handed to the caller through the future
                outcome.set_exception(error)
                return
            written.add_done_callback(lambda done: _copy_outcome(done, outcome))

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name, initializer=serial_torch)
            self._last = self._pool.submit(job)
        return outcome

    def drain(self) -> None:
        """Wait until every job submitted so far has handed its records to the writer."""
        last = self._last
        if last is not None:
            last.result()  # job() never raises

    def close(self) -> None:
        """Drain, then stop the thread. Idempotent."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _copy_outcome(done: Future[None], outcome: Future[None]) -> None:
    error = done.exception()
    if error is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(done.result())
