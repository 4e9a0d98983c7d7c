"""hkv.memory: freed heap pages go back to the OS on request (trim_heap, rate-limited), and not
after every op while decoding (steady_heap). glibc only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in memory.MALLOC_ENV}
    return {**env, **extra}


@pytest.mark.skipif(memory._mallopt is None, reason="needs glibc's mallopt")
def test_steady_heap_stops_decode_temporaries_faulting_in() -> None:
    # a fresh process: malloc's thresholds are process-wide and the suite may have set them
    run = subprocess.run([sys.executable, str(SCRIPTS / "heap_faults.py"), "--child", "steady", "--calls", "30"],
                         capture_output=True, text=True, env=_clean_env(), check=True)  # fmt: skip
    result = json.loads(run.stdout)
    # glibc's defaults re-fault ~1,700 pages per call here (scripts/heap_faults.py)
    assert result["faults_per_call"] < 50, result


@pytest.mark.skipif(memory._mallopt is None, reason="needs glibc's mallopt")
def test_steady_heap_runs_once_and_leaves_the_users_malloc_settings() -> None:
    code = "from hkv import memory; print(memory.steady_heap(), memory.steady_heap())"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), check=True)
    assert fresh.stdout.split() == ["True", "False"]
    users = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=_clean_env(MALLOC_TRIM_THRESHOLD_="1048576"), check=True)  # fmt: skip
    assert users.stdout.split() == ["False", "False"]
