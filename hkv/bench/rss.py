"""Resident memory of this process, sampled by a background thread, for the benchmarks.

Linux splits resident memory (``/proc/self/status``) into ``RssAnon`` (heap, tensors, the tier
pools once touched) and ``RssFile`` (file pages mapped into the process: shared libraries, and
LMDB's memory map once records are read through it). ``ru_maxrss`` (:func:`lifetime_peak_bytes`)
is the peak of their sum over the whole life of the process, so a figure per phase needs either
a fresh process per measurement or this sampler, which records the peaks between ``start`` and
``stop`` every ``interval_s`` (a peak shorter than the interval can be missed).
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")


def rss_bytes() -> dict[str, int]:
    """``{"rss", "anon", "file"}`` in bytes now (``anon`` and ``file`` are 0 where /proc is absent)."""
    try:
        fields = {}
        for line in _STATUS.read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) * 1024  # the file says kB, meaning KiB
        return {"rss": fields["VmRSS"], "anon": fields.get("RssAnon", 0), "file": fields.get("RssFile", 0)}
    except (OSError, KeyError, ValueError):
        import psutil

        return {"rss": int(psutil.Process().memory_info().rss), "anon": 0, "file": 0}


def lifetime_peak_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (the peak resident set since it started)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


class RssSampler:
    """Peak resident bytes between :meth:`start` and :meth:`stop` (a context manager); the
    thread is owned and joined by :meth:`stop`. ``peak``: ``{"rss", "anon", "file"}``, each the
    largest value seen (not necessarily at the same instant)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = rss_bytes()
        for name, value in now.items():
            self.peak[name] = max(self.peak[name], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="hkv-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        return dict(self.peak)

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
