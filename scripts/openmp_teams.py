"""What a second OpenMP team costs the model's thread (why ``hkv/threads.py`` exists).

Times a loop of SmolLM2-135M-shaped decode matmuls (one token: q/k/v/o and MLP projections of
30 layers) on the main thread, each case in a fresh process:

- ``alone``: nothing else in the process;
- ``team``: one other thread ran a large torch op (so GNU OpenMP gave it a team of its own)
  and now sits idle, as an hkv worker did between jobs before ``hkv/threads.py``;
- ``serial``: the same thread, but it called :func:`hkv.threads.serial_torch` first (what hkv's
  threads do now).

Prints ms per loop (median of ``--repeats``) and each case against ``alone``. The other thread
uses no CPU while the loop runs: what ``team`` costs is libgomp's "throttled" spinning (more
OpenMP threads than CPUs: every team sleeps after each parallel region and is woken for the
next). On a machine with more CPUs than both teams hold together, ``team`` costs nothing.

    python scripts/openmp_teams.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

import torch

HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30  # SmolLM2-135M


def _loop_ms(repeats: int) -> float:
    """Median ms of one pass of a layer stack's projections for one token (fp32)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
    weights = [torch.randn(shape, generator=g) for shape in shapes]
    x, h = torch.randn(1, HIDDEN, generator=g), torch.randn(1, INTERMEDIATE, generator=g)
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        for _ in range(LAYERS):
            for w in weights:
                (h if w.shape[0] == INTERMEDIATE else x) @ w
            torch.softmax(torch.randn(1, 9, 8192, generator=g), dim=-1)  # an attention-sized op above the grain
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:])


def _case(case: str, repeats: int) -> float:
    """ms per loop for ``case``, in this process."""
    done = threading.Event()
    if case in ("team", "serial"):
        started = threading.Event()

        def other() -> None:
            if case == "serial":
                from hkv.threads import serial_torch

                serial_torch()
            torch.randn(4096, 4096).mul_(2).sum()  # large enough to start a parallel region
            started.set()
            done.wait()

        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        started.wait()
    try:
        return _loop_ms(repeats)
    finally:
        done.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--case", choices=("alone", "team", "serial"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(_case(args.case, args.repeats))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {torch.__config__.parallel_info().splitlines()[-1].strip()}")
    results = {}
    for case in ("alone", "team", "serial"):
        out = subprocess.run([sys.executable, __file__, "--case", case, "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        results[case] = float(out.stdout.strip().splitlines()[-1])
    for case, ms in results.items():
        print(f"{case:7s} {ms:8.2f} ms per loop  {ms / results['alone']:5.2f}x alone")


if __name__ == "__main__":
    main()
