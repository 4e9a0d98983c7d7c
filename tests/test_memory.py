"""hkv.memory.trim_heap: freed heap pages go back to the OS (glibc), rate-limited."""

from __future__ import annotations

import pytest

from hkv import memory


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(memory._malloc_trim is None, reason="needs glibc's malloc_trim")
def test_trim_heap_returns_freed_pages_inside_the_heap() -> None:
    # 64 KiB blocks come from the heap (below malloc's mmap threshold); keeping every 16th alive
    # leaves the freed ones as holes that malloc never returns on its own.
    blocks = [bytearray(64 << 10) for _ in range(3072)]  # 192 MiB, touched (zero-filled)
    kept = blocks[::16]
    del blocks
    before = _rss_anon_bytes()
    assert memory.trim_heap(force=True)
    after = _rss_anon_bytes()
    assert before - after > 64 << 20, f"RssAnon {before >> 20} MiB before the trim, {after >> 20} MiB after"
    assert len(kept) == 192


def test_trim_heap_is_rate_limited() -> None:
    memory.trim_heap(force=True)
    assert not memory.trim_heap()  # within MIN_INTERVAL_S of the last one
