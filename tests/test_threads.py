"""hkv's own threads run torch ops without an OpenMP team of their own (hkv/threads.py)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from hkv.prefetch.prefetcher import Prefetcher
from hkv.store.encoder import OrderedEncoder
from hkv.threads import _openmp_setters, serial_thread, serial_torch

openmp = pytest.mark.skipif(not _openmp_setters(), reason="torch runs no OpenMP runtime here")


def _in_thread(run) -> object:  # type: ignore[no-untyped-def]
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(run()))
    thread.start()
    thread.join()
    return result[0]


@openmp
def test_serial_torch_sets_only_the_calling_threads_count() -> None:
    before = torch.get_num_threads()
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    expected = x @ x  # on this thread's team

    def run() -> tuple[bool, int, bool]:
        took = serial_torch()
        return took, torch.get_num_threads(), torch.allclose(x @ x, expected, rtol=1e-5, atol=1e-4)  # serial, same result

    assert _in_thread(run) == (True, 1, True)
    assert torch.get_num_threads() == before  # the process-wide count and this thread's are untouched
    assert _in_thread(torch.get_num_threads) == before  # a thread hkv did not start keeps torch's count


@openmp
def test_hkv_threads_run_serial() -> None:
    counts: list[int] = []
    thread = serial_thread(lambda: counts.append(torch.get_num_threads()), name="hkv test")
    thread.start()
    thread.join()
    with Prefetcher(None, workers=2) as prefetcher:  # type: ignore[arg-type]
        counts.append(prefetcher._pool.submit(torch.get_num_threads).result())
    encoder = OrderedEncoder("hkv test encoder")
    try:
        seen: Future[None] = Future()

        def job() -> Future[None]:
            counts.append(torch.get_num_threads())
            seen.set_result(None)
            return seen

        encoder.submit(job).result(timeout=10)
    finally:
        encoder.close()
    assert counts == [1, 1, 1]


def test_serial_torch_without_openmp_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import hkv.threads as threads

    monkeypatch.setattr(threads, "_openmp_setters", lambda: ())
    assert _in_thread(threads.serial_torch) is False


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settled_threads() -> int:
    """The process's thread count once threads that ended have left /proc (they linger a moment)."""
    count, deadline = _native_threads(), time.monotonic() + 2
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _native_threads()
        if now == count:
            break
        count = now
    return count


@openmp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2, reason="needs /proc and 2+ torch threads")
def test_an_hkv_thread_starts_no_openmp_team() -> None:
    """The property itself: a large op in a thread hkv starts adds no OpenMP thread to the
    process, where the same op in a plain thread starts a team (the control)."""
    torch.randn(1024, 1024).mul_(2).sum()  # this thread's own team exists before counting

    def threads_added_by_a_large_op() -> int:
        before = _native_threads()
        torch.randn(2048, 2048).mul_(2).sum()
        return _native_threads() - before

    _settled_threads()
    added: list[int] = []
    thread = serial_thread(lambda: added.append(threads_added_by_a_large_op()), name="hkv test")
    thread.start()
    thread.join()
    _settled_threads()
    plain = _in_thread(threads_added_by_a_large_op)
    assert added == [0]
    assert plain >= 1  # the control: a plain thread's op starts a team of its own
