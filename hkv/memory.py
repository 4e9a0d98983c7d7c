"""How hkv's process uses memory: glibc's heap gives freed memory back to the OS during long
prefills, and not after every tensor op while decoding; and pools whose rows the disk can fill
straight (:func:`page_aligned_empty`).

Why: a prefill chunk allocates and frees hundreds of MB of temporaries (activations, attention
pieces, block copies) from several threads. glibc's malloc keeps much of what is freed in its
arenas (its mmap threshold grows with the largest block freed, so big tensors end up in the heap
too), and the resident set creeps up with nothing live in it: on a synthetic 64K-96K-token fill
with small tiers (``scripts/heap_probe.py``), 35-130 MB of the anonymous RSS was free heap that
``malloc_trim(0)`` gave back, and the 1M-token run grew by ~1.7 KB per token beyond its pools,
model and summaries.
:func:`trim_heap` calls ``malloc_trim(0)`` (glibc only; a no-op elsewhere), at most once per
``MIN_INTERVAL_S`` so that short chunks do not pay for it.

The opposite problem while decoding: with glibc's default (dynamic) thresholds, the megabyte-sized
temporaries of one decode step (block scores over 15K blocks per layer at 1M tokens, re-rotated
keys, gathered pieces) are unmapped or trimmed when freed and faulted in again, zero-filled, by
the next op: re-rotating 32 blocks took ~2.7 ms with ~1,700 page faults per call, 0.2 ms with
none once the thresholds were fixed (``scripts/heap_faults.py``). :func:`steady_heap` fixes
them (``mallopt``): allocations below ``MMAP_THRESHOLD_BYTES`` come from the heap, and up to
``TRIM_THRESHOLD_BYTES`` of free memory at its top is kept. :class:`~hkv.integrations.runtime.Runtime`
calls it once per process, unless the user set glibc's own ``MALLOC_*`` variables.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading
import time

import torch

MIN_INTERVAL_S = 1.0  # seconds between two trims (one takes a few ms on a multi-GB heap)
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD_BYTES = 128 << 20  # free memory at the heap's top kept between decode steps
# glibc's environment tunables: when the user set one, the user's choice stands
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    _malloc_trim = _libc.malloc_trim
    _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt = _libc.mallopt
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim or tune
    _malloc_trim = _mallopt = None

_steady = False  # steady_heap() already ran in this process

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


def steady_heap() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module doc) once per process; True when
    they were set now. Leaves them alone when any of ``MALLOC_ENV`` is set or off glibc."""
    global _steady
    if _mallopt is None or any(name in os.environ for name in MALLOC_ENV):
        return False
    with _lock:
        if _steady:
            return False
        _steady = True
    return bool(_mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(_mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


PAGE_BYTES = 4096


def page_aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu", *,
                       pin_memory: bool = False) -> torch.Tensor:  # fmt: skip
    """``torch.empty(shape, dtype=dtype, device=device, pin_memory=pin_memory)`` whose data starts
    on a page boundary on the CPU (PyTorch's allocator aligns to 64 bytes): rows of a whole number
    of 512-byte units can then take O_DIRECT reads straight from the disk
    (:mod:`hkv.store.linux_aio`). Other devices: a plain ``torch.empty``."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(nbytes + PAGE_BYTES, dtype=torch.uint8, pin_memory=pin_memory)
    skip = -raw.data_ptr() % PAGE_BYTES
    return raw[skip : skip + nbytes].view(dtype).view(shape)
