"""The prefetcher: thread pool lifetime, best-effort promotion, and -- through SequenceKV over the
real TierManager -- bitwise identical outputs with prefetch on and off, with hits when on."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hkv.blocks import BlockKey
from hkv.prefetch.prefetcher import Prefetcher

from helpers.sequences import Driver, make_config, open_sequence


class RecordingManager:
    """Only what the prefetcher calls: ``missing_from`` (nothing resident), ``promote``,
    ``write_back`` and ``clean_host`` (nothing to clean)."""

    def __init__(self, *, delay: float = 0.0, fail: bool = False) -> None:
        self.promoted: list[BlockKey] = []
        self.threads: set[str] = set()
        self.delay, self.fail = delay, fail
        self.lock = threading.Lock()
        self.write_backs: list[int] = []
        self.host_cleanings: list[int] = []

    def missing_from(self, keys, to):
        return list(keys)

    def write_back(self, limit: int) -> int:
        with self.lock:
            self.write_backs.append(limit)
        return 0

    def clean_host(self, limit: int) -> int:
        with self.lock:
            self.host_cleanings.append(limit)
        return 0

    def promote(self, keys, to="device") -> None:
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("disk unplugged")
        with self.lock:
            self.promoted.extend(keys)
            self.threads.add(threading.current_thread().name)


def _keys(n: int) -> list[BlockKey]:
    return [BlockKey(i.to_bytes(16, "little")) for i in range(n)]


def test_submit_promotes_every_key_on_worker_threads() -> None:
    manager = RecordingManager(delay=0.01)
    with Prefetcher(manager, workers=3, job_blocks=4) as prefetcher:
        ticket = prefetcher.submit(0, _keys(20))
        ticket.wait()
        assert ticket.done() and not ticket.pending_keys()
        assert sorted(manager.promoted) == sorted(_keys(20))
        assert all(name.startswith("hkv-prefetch") for name in manager.threads)
        assert prefetcher.stats().submitted_blocks == 20
    assert not any(t.name.startswith("hkv-prefetch") and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize(("job_blocks", "jobs"), [(4, 5), (16, 2), (64, 1)])
def test_a_submission_is_split_into_jobs_of_job_blocks(job_blocks: int, jobs: int) -> None:
    """Each job is one promote call (one batch of disk reads in flight together)."""
    manager = RecordingManager()
    calls: list[int] = []
    promote = manager.promote
    manager.promote = lambda keys, to="device": (calls.append(len(keys)), promote(keys, to))  # type: ignore[method-assign]
    with Prefetcher(manager, workers=1, job_blocks=job_blocks) as prefetcher:
        prefetcher.submit(0, _keys(20), to="host").wait()
        assert prefetcher.stats().jobs == jobs
    assert sorted(calls, reverse=True) == [min(job_blocks, 20 - i * job_blocks) for i in range(jobs)]


def test_failures_are_counted_not_raised_and_close_is_idempotent() -> None:
    prefetcher = Prefetcher(RecordingManager(fail=True), workers=1)
    ticket = prefetcher.submit(0, _keys(3))
    ticket.wait()
    assert prefetcher.stats().failed_jobs == 1
    prefetcher.close()
    prefetcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.submit(0, _keys(1))


def test_cancel_drops_queued_jobs() -> None:
    manager = RecordingManager(delay=0.05)
    with Prefetcher(manager, workers=1, job_blocks=1) as prefetcher:
        ticket = prefetcher.submit(0, _keys(10))
        assert ticket.pending_keys()
        prefetcher.cancel(ticket)
        ticket.wait()
        assert len(manager.promoted) < 10 and prefetcher.stats().cancelled_jobs > 0


def _decode_run(tmp_path, *, prefetch: bool, mode: str, device: str = "cpu"):
    config = make_config(tmp_path, mode=mode, block=4, sink=4, local=4, budget=16, chunk=8, device_blocks=12, host_blocks=4,
                         prefetch=prefetch)
    prefetcher = Prefetcher(None, workers=2) if prefetch else None
    manager, seq = open_sequence(config, prefetcher=prefetcher, device=device)
    if prefetcher is not None:
        prefetcher.manager = manager
    try:
        driver = Driver(seq, manager, seed=7)
        outputs = [out for out, _ in driver.step(50)]
        for _ in range(10):
            outputs += [out for out, _ in driver.step(1)]
        return outputs, seq.stats()
    finally:
        seq.close()
        if prefetcher is not None:
            prefetcher.close()
        manager.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", ["sparse", "exact"])
def test_prefetch_never_changes_results(tmp_path, mode: str, device: str) -> None:
    off, stats_off = _decode_run(tmp_path / "off", prefetch=False, mode=mode, device=device)
    on, stats_on = _decode_run(tmp_path / "on", prefetch=True, mode=mode, device=device)
    assert len(on) == len(off)
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    assert stats_off.predicted == 0 and stats_off.hit == 0
    if mode == "sparse":
        assert stats_on.predicted > 0 and stats_on.hit > 0, stats_on
        assert stats_on.hit + stats_on.late <= stats_on.needed


class ResidencyManager(RecordingManager):
    """A manager that also answers the prefetcher's residency hint and write-back calls."""

    def __init__(self, resident: set[BlockKey]) -> None:
        super().__init__()
        self.resident = resident

    def missing_from(self, keys, to):
        return [key for key in keys if key not in self.resident]

    def write_back(self, limit: int) -> int:
        with self.lock:
            self.write_backs.append(limit)
        return 1

    def clean_host(self, limit: int) -> int:
        with self.lock:
            self.host_cleanings.append(limit)
        return 2


def test_submit_skips_resident_blocks_and_keeps_victims_clean() -> None:
    keys = _keys(10)
    manager = ResidencyManager(set(keys[::2]))
    with Prefetcher(manager, workers=2, job_blocks=4) as prefetcher:
        ticket = prefetcher.submit(0, keys)
        ticket.wait()
        assert ticket.keys == keys  # the ticket still names every predicted block (hit counting)
        assert sorted(manager.promoted) == sorted(keys[1::2])
        stats = prefetcher.stats()
        assert (stats.submitted_blocks, stats.skipped_blocks) == (5, 5)
        assert manager.write_backs and stats.written_back_blocks == len(manager.write_backs)
        assert manager.host_cleanings and stats.cleaned_host_blocks == 2 * len(manager.host_cleanings)
        # Everything resident: no promotion and no write-back job is queued.
        manager.resident.update(keys)
        jobs, write_backs = stats.jobs, len(manager.write_backs)
        ticket = prefetcher.submit(0, keys)
        ticket.wait()
        assert ticket.done() and not ticket.pending_keys()
        assert sorted(manager.promoted) == sorted(keys[1::2])
        stats = prefetcher.stats()
        assert stats.jobs == jobs and len(manager.write_backs) == write_backs
        assert (stats.submitted_blocks, stats.skipped_blocks) == (5, 15)

