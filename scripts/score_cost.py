"""What block selection costs per decode step as the context grows (docs/benchmarks.md).

Times :func:`hkv.attention.selection.select_blocks` (what attention runs per layer to pick its
blocks) for one decode query over the block summaries of every layer of SmolLM2-135M's shape (30
layers, 9 query / 3 KV heads, head_dim 64, 64-token blocks, budget 2,048 tokens), random
summaries, at several context lengths. Prints milliseconds per decode step (all layers), the
median of ``--repeats`` steps.

    python scripts/score_cost.py [--contexts 8192,131072,393216,1000000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hkv.attention.selection import select_blocks

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 64
SINK_BLOCKS, LOCAL_BLOCKS, TOPK = 1, 4, 27  # budget 2,048 tokens = 64 sink + 27 blocks + 256 local


def step_ms(summaries: list[torch.Tensor], query: torch.Tensor) -> float:
    start = time.perf_counter()
    for summary in summaries:
        select_blocks(query, summary, past_blocks=summary.shape[-1], sink_blocks=SINK_BLOCKS,
                      local_blocks=LOCAL_BLOCKS, topk=TOPK, margin=0.25)  # fmt: skip
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8192,131072,393216,1000000")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    query = torch.randn(Q_HEADS, 1, HEAD_DIM)
    print(f"torch threads {torch.get_num_threads()}")
    for context in (int(c) for c in args.contexts.split(",")):
        blocks = context // BLOCK
        low = torch.randn(LAYERS, KV_HEADS, HEAD_DIM, blocks)
        summaries = [torch.stack([low[i], low[i] + torch.rand_like(low[i])]) for i in range(LAYERS)]
        del low
        step_ms(summaries, query)  # warm-up
        times = [step_ms(summaries, query) for _ in range(args.repeats)]
        mib = sum(s.numel() * s.element_size() for s in summaries) / 2**20
        print(f"context {context:>9,} tokens  {blocks:>6} blocks/layer  summaries {mib:7.1f} MiB  "
              f"selection {statistics.median(times):7.1f} ms per decode step (median of {args.repeats})")


if __name__ == "__main__":
    main()
