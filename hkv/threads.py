"""How hkv's own threads run torch ops: on their own core, never with an OpenMP team of their own.

Why: torch's CPU ops split work above ~32K elements over an OpenMP team, and with GNU OpenMP
(``libgomp``, which torch's Linux wheels bundle) every thread that starts a parallel region gets
a team of its own, whose threads live as long as that thread. Once the process holds more
OpenMP threads than the machine has CPUs, libgomp stops spinning between parallel regions
(``GOMP_SPINCOUNT``'s "throttled" count, ~100 spins instead of ~300,000) and puts every team's
threads to sleep after each region, so each of the model thread's matmuls, softmaxes and copies
then pays a futex wake-up. ``python scripts/openmp_teams.py`` shows it on its own: on the 2-core
CPU machine a loop of SmolLM2-shaped decode matmuls took 3.2x as long once an idle second thread
had run one large op (47.6 against 15.1 ms), 1.0x when that thread had called
:func:`serial_torch` first. In hkv: one encoder thread that had
encoded blocks (a team of its own) made the decode step's ``aten::mm`` 1.8x slower, and a
128K-token disk-bound step with int4 records took 168 ms with prefetch off against 105 ms once
the encoder and the prefetch workers ran serial (189-205 against 132 ms with prefetch on:
``hkv bench decode --preset disk --disk-encoding int4``, docs/benchmarks.md). hkv's background
threads (prefetch workers, the encoder, the disk writer, session pulls) therefore set their own
OpenMP thread count to 1 (:func:`serial_torch`): their ops run inline, the model's thread keeps
the machine's team, and only that one exists.

:func:`serial_torch` touches only the calling thread (``omp_set_num_threads`` sets a per-thread
value), not ``torch.set_num_threads``' process-wide one. Where torch does not use an OpenMP
runtime found in the process (other platforms, other builds) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import os
import threading
from functools import cache

import torch

# OpenMP runtimes torch builds link: GNU (libgomp, Linux wheels), LLVM (libomp), Intel (libiomp5)
_RUNTIMES = ("libgomp", "libomp", "libiomp5")


@cache
def _openmp_setters() -> tuple[ctypes._CFuncPtr, ...]:  # type: ignore[name-defined]
    """``omp_set_num_threads`` of every OpenMP runtime loaded in this process (Linux: the
    shared objects ``/proc/self/maps`` names), found once; none where torch's ops do not run
    on OpenMP."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return ()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if ".so" in line}
    except OSError:
        return ()
    setters = []
    for path in sorted(paths):
        if os.path.basename(path).startswith(_RUNTIMES):
            try:
                library = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0))  # the copy already loaded
                setter = library.omp_set_num_threads
            except (OSError, AttributeError):
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], None
            setters.append(setter)
    return tuple(setters)


def serial_torch() -> bool:
    """Make torch's CPU ops run inline in the calling thread (an OpenMP team of one), leaving
    every other thread's count as it is; True where an OpenMP runtime took it. For threads hkv
    starts (a ``ThreadPoolExecutor`` initializer, the first line of a thread's target), before
    their first torch op: a team once started lives as long as its thread."""
    setters = _openmp_setters()
    if not setters:
        return False
    # ATen sets a new thread's OpenMP count to the process-wide one at its first op: let it do
    # so now, then lower this thread's own.
    torch.get_num_threads()
    for setter in setters:
        setter(1)
    return True


def serial_thread(target, *, name: str, daemon: bool = True) -> threading.Thread:  # type: ignore[no-untyped-def]
    """A ``threading.Thread`` running ``target()`` after :func:`serial_torch` (not started)."""

    def run() -> None:
        serial_torch()
        target()

    return threading.Thread(target=run, name=name, daemon=daemon)
