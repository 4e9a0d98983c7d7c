"""Page faults and time of one decode-sized tensor op loop, with glibc's default heap thresholds
and with :func:`hkv.memory.steady_heap` (diagnosis behind hkv/memory.py; Linux + glibc).

usage: python scripts/heap_faults.py [--calls 100]

Each mode runs in its own process (malloc's thresholds are process-wide and only ever move
one way): it re-rotates 32 gathered fp16 blocks of SmolLM2's shape (3 KV heads x 64 tokens x
64 dims, moved ~1M positions, as ``attention.positions = "remap"`` does at every decode step and
layer) ``--calls`` times and prints minor page faults and milliseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def child(mode: str, calls: int) -> dict:
    import torch

    from hkv import memory
    from hkv.positions import RotaryShift

    if mode == "steady" and not memory.steady_heap():
        raise SystemExit("steady_heap() did not run (not glibc, or a MALLOC_* variable is set)")
    rotary = RotaryShift(1.0 / (100000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)))
    keys = torch.randn(3, 32 * 64, 64).half()
    deltas = [15000 * 64 - i * 400 * 64 for i in range(28)] + [0] * 4
    for _ in range(10):  # warm-up
        rotary.rotate_blocks(keys, deltas, 64)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(calls):
        rotary.rotate_blocks(keys, deltas, 64)
    elapsed = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"mode": mode, "faults_per_call": faults / calls, "ms_per_call": 1000 * elapsed / calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--child", choices=["default", "steady"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.calls)))
        return
    from hkv.memory import MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}  # glibc's defaults in "default"
    for mode in ("default", "steady"):
        run = subprocess.run([sys.executable, __file__, "--child", mode, "--calls", str(args.calls)],
                             capture_output=True, text=True, check=True, env=env)  # fmt: skip
        result = json.loads(run.stdout)
        print(f"{mode:8s} {result['faults_per_call']:8.1f} page faults, {result['ms_per_call']:6.2f} ms per call")


if __name__ == "__main__":
    main()
