"""The asynchronous prefetcher: moves predicted blocks up to the device on worker threads.

Two predictions feed it at decode steps. After layer ``l`` of step ``t`` has chosen its blocks,
:class:`~hkv.attention.sequence.SequenceKV` submits the blocks that query predicts for layer
``l`` at step ``t + 1`` (its top-k plus a margin). With ``prefetch.next_layer`` (off by default;
models with the Llama layer layout) that prediction is kept for layer 0 only: at step ``t + 1``
the forward pre-hook of layer ``l - 1`` estimates layer ``l``'s query from layer ``l - 1``'s
input (:mod:`hkv.integrations.next_layer`) and replaces it, a prediction from this step's token
with one layer's compute as lead time. Workers call :meth:`TierManager.promote` (disk -> host
-> device; on CUDA the host -> device copy runs on the manager's copy stream; on a CPU, where the
two RAM pools are one tensor and read in place, disk -> host only) while the main thread computes. When a layer attends, :meth:`TierManager.gather` waits for blocks still in
flight and fetches misses on demand, so results never depend on timing.

After the promotions of a submission, the last job keeps the next victims clean: device blocks
get a host copy (:meth:`TierManager.write_back`) and host blocks a disk copy
(:meth:`TierManager.clean_host`), so that making room on the critical path drops blocks instead
of copying them down.

One prefetcher may serve several sequences (the runtime owns it); it owns its thread pool and
:meth:`close` joins it. Promotion is best effort: a failed promote is counted, never raised into
the model's forward.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..blocks import BlockKey
from ..threads import serial_torch
from ..tiers.manager import TierManager

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefetcherStats:
    """Totals over the prefetcher's life (counts of blocks and jobs)."""

    submitted_blocks: int = 0  # blocks queued for promotion
    skipped_blocks: int = 0  # blocks asked for that were already on the device
    written_back_blocks: int = 0  # device blocks given a host copy ahead of their eviction
    cleaned_host_blocks: int = 0  # host blocks given a disk copy ahead of their eviction
    jobs: int = 0  # promotion and write-back jobs queued
    cancelled_jobs: int = 0
    failed_jobs: int = 0


class PrefetchTicket:
    """One submission: the keys asked for and the futures moving them."""

    __slots__ = ("keys", "_futures")

    def __init__(self, keys: Sequence[BlockKey], futures: list[Future]) -> None:
        self.keys = list(keys)
        self._futures = futures

    def done(self) -> bool:
        """True once every worker job of this ticket has finished (or was cancelled)."""
        return all(f.done() for f in self._futures)

    def pending_keys(self) -> set[BlockKey]:
        """Keys whose job has not finished yet (in flight or queued)."""
        pending: set[BlockKey] = set()
        for future in self._futures:
            if not future.done():
                pending.update(future.hkv_keys)  # type: ignore[attr-defined]
        return pending

    def cancel(self) -> int:
        """Cancel the jobs not started yet; returns how many were cancelled."""
        return sum(1 for f in self._futures if f.cancel())

    def wait(self, timeout: float | None = None) -> None:
        for future in self._futures:
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 -- counted by the job itself; prefetch is best effort
                pass


class Prefetcher:
    """Promotes blocks to the device tier on ``workers`` threads (or where ``submit`` says: a
    sequence asks for the manager's ``prefetch_tier``, the host on a CPU whose two RAM pools are
    one tensor).

    ``manager``: a :class:`~hkv.tiers.manager.TierManager`; the prefetcher calls its
    ``missing_from``, ``promote`` and ``write_back`` (thread-safe).
    """

    def __init__(self, manager: TierManager, workers: int = 2, *, job_blocks: int = 16) -> None:
        if workers < 1:
            raise ValueError(f"workers = {workers}: must be at least 1")
        self.manager = manager
        self.workers = workers
        self.job_blocks = job_blocks  # blocks per promote call: small jobs spread over workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hkv-prefetch", initializer=serial_torch)
        self._lock = threading.Lock()
        self._stats = PrefetcherStats()
        self._closed = False

    def submit(self, layer: int, keys: Sequence[BlockKey], to: str = "device") -> PrefetchTicket:
        """Start promoting ``keys`` (best first) to ``to``; returns at once.

        ``layer`` is informational (logs); the caller keeps the ticket to cancel stale work and
        to tell hits from late blocks."""
        if self._closed:
            raise RuntimeError("this Prefetcher is closed")
        futures: list[Future] = []
        # Skip blocks already there before queueing anything (a lock-free hint; promote checks
        # again under the manager's lock): consecutive steps predict mostly the same blocks, and
        # a job per resident block would only cost the main thread GIL and lock time.
        todo = self.manager.missing_from(keys, to)
        size = max(1, self.job_blocks)
        # Keep the device's next eviction victims clean (a host copy below them), so that making
        # room for these blocks, or for a gather's misses, drops instead of copying down on the
        # critical path. Only when something is promoted (with nothing to promote, nothing is
        # evicted for the prefetch), and in the last promotion job rather than a job of its own:
        # every job is a thread hand-off that takes the GIL from the model's thread.
        clean = max(len(todo), 4 * size) if to == "device" else 0
        for start in range(0, len(todo), size):
            part = todo[start : start + size]
            last = start + size >= len(todo)
            future = self._pool.submit(self._promote, layer, part, to, clean if last else 0)
            future.hkv_keys = part  # type: ignore[attr-defined]
            futures.append(future)
        with self._lock:
            self._stats.submitted_blocks += len(todo)
            self._stats.skipped_blocks += len(keys) - len(todo)
            self._stats.jobs += len(futures)
        return PrefetchTicket(keys, futures)

    def cancel(self, ticket: PrefetchTicket | None) -> None:
        if ticket is not None:
            cancelled = ticket.cancel()
            if cancelled:
                with self._lock:
                    self._stats.cancelled_jobs += cancelled

    def _promote(self, layer: int, keys: list[BlockKey], to: str, clean: int = 0) -> None:
        """Promote ``keys``; then, with ``clean``, write back up to that many device victims."""
        try:
            self.manager.promote(keys, to)
        except Exception:  # noqa: BLE001 -- prefetch is best effort; gather fetches on demand
            log.debug("prefetch of %d blocks of layer %d failed", len(keys), layer, exc_info=True)
            with self._lock:
                self._stats.failed_jobs += 1
        if clean:
            self._write_back(layer, clean)

    def _write_back(self, layer: int, limit: int) -> None:
        """Keep the next victims of the device and of the host clean (a copy one tier down)."""
        try:
            cleaned = self.manager.write_back(limit)
            written = self.manager.clean_host(limit)
        except Exception:  # noqa: BLE001 -- best effort, like promotion
            log.debug("write-back for layer %d failed", layer, exc_info=True)
            with self._lock:
                self._stats.failed_jobs += 1
            return
        if cleaned or written:
            with self._lock:
                self._stats.written_back_blocks += cleaned
                self._stats.cleaned_host_blocks += written

    def stats(self) -> PrefetcherStats:
        with self._lock:
            return PrefetcherStats(**{name: getattr(self._stats, name) for name in PrefetcherStats.__slots__})

    def close(self) -> None:
        """Cancel queued jobs, wait for running ones, join the threads. Idempotent."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
