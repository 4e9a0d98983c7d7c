"""Giving freed heap memory back to the operating system during long prefills.

Why: a prefill chunk allocates and frees hundreds of MB of temporaries (activations, attention
pieces, block copies) from several threads. glibc's malloc keeps much of what is freed in its
arenas (its mmap threshold grows with the largest block freed, so big tensors end up in the heap
too), and the resident set creeps up with nothing live in it: on a synthetic 64K-96K-token fill
with small tiers (``scripts/heap_probe.py``), 35-130 MB of the anonymous RSS was free heap that
``malloc_trim(0)`` gave back, and the 1M-token run grew by ~1.7 KB per token beyond its pools,
model and summaries.
:func:`trim_heap` calls ``malloc_trim(0)`` (glibc only; a no-op elsewhere), at most once per
``MIN_INTERVAL_S`` so that short chunks do not pay for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

MIN_INTERVAL_S = 1.0  # seconds between two trims (one takes a few ms on a multi-GB heap)

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
    _malloc_trim = None

_last = 0.0  # time.monotonic() of the last trim
_lock = threading.Lock()  # several sequences may prefill at once: one trim per interval


def trim_heap(*, force: bool = False) -> bool:
    """Return the heap's free pages to the OS; True if a trim ran (not rate-limited, glibc)."""
    global _last
    if _malloc_trim is None:
        return False
    with _lock:
        now = time.monotonic()
        if not force and now - _last < MIN_INTERVAL_S:
            return False
        _last = now
    _malloc_trim(0)
    return True
