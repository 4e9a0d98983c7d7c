"""Where a decode step's time goes: torch.profiler over a few decode steps of hkv and of
DynamicCache, same model and context as ``hkv bench decode`` (SmolLM2-135M's shape, random
weights, synthetic KV), after the bench's own timed steps.

Prints, per cache: the ops by self CPU time (the host's share: launches, Python-side torch
calls) and, on a GPU, kernel launches per step and the CUDA time per step. Used by
``scripts/gpu_check.sh`` (stage ``profile``) to decide what to fuse or capture next.

    python scripts/profile_decode.py --device cuda --context 8192 --steps 4 [--dtype float16]
    python scripts/profile_decode.py --context 131072 --dtype float32 --storage float16 --device-budget 360MiB
"""

from __future__ import annotations

import argparse

import torch

import hkv.bench.decode as decode_bench
from hkv import Config
from hkv.bench.smollm2 import build_model

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4, help="decode steps profiled per cache")
    parser.add_argument("--dtype", default="float16", help="the model's dtype (float16, bfloat16, float32)")
    parser.add_argument("--device-budget", default="8GiB", help="hkv's device tier (default: the whole KV at 128K)")
    parser.add_argument("--storage", default="auto", help="hkv's tiers.dtype (auto: the model's)")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    model, weights = build_model("random", device=args.device, max_tokens=args.context)
    model = model.to(getattr(torch, args.dtype))
    cuda = torch.device(args.device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    timed = decode_bench._time_steps

    def profiled(model, cache, steps, warmup=2, on_warm=None, before_step=None):  # the bench's timing, then profiled steps
        times = timed(model, cache, steps, warmup, on_warm, before_step)
        with torch.profiler.profile(activities=activities) as prof:
            timed(model, cache, args.steps, 0, before_step=before_step)
        events = prof.key_averages()
        name = type(cache).__name__
        print(f"\n=== {name}: {args.steps} decode steps at {args.context} tokens, median timed step {1000 * sorted(times)[len(times) // 2]:.2f} ms")
        if cuda:
            launches = sum(e.count for e in events if e.key in LAUNCHES)
            device_us = sum(e.self_device_time_total for e in events)
            print(f"kernel launches per step: {launches / args.steps:.0f}; CUDA time per step: {device_us / 1000 / args.steps:.2f} ms")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        return times

    decode_bench._time_steps = profiled
    config = Config.load(tiers={"device": args.device_budget, "host": "8GiB", "disk": "16GiB", "dtype": args.storage})
    figures = decode_bench.run_decode_bench(config, contexts=(args.context,), steps=8, device=args.device, model=model,
                                            weights=weights)  # fmt: skip
    decode_bench.print_table(figures)


if __name__ == "__main__":
    main()
