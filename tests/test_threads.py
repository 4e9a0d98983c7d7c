"""hkv's own threads run torch ops without an OpenMP team of their own (hkv/threads.py)."""

from __future__ import annotations

import threading
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

    def run() -> tuple[bool, int, bool]:
        took = serial_torch()
        x = torch.randn(512, 512)
        return took, torch.get_num_threads(), torch.allclose((x @ x).sum(), (x @ x).sum())

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
