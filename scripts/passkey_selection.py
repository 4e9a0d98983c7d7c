"""Is the passkey's block selected at the answer step, layer by layer? (diagnosis, not a benchmark)

usage: python scripts/passkey_selection.py LENGTH DEPTH MODE [force] [--budget 2048]
  e.g. OMP_NUM_THREADS=1 python scripts/passkey_selection.py 32768 0.9 remap

Builds `hkv bench passkey`'s prompt (same seed), answers it with MODE (original / remap, budget
2048, the bench's config) and prints, for the last prompt chunk and the first decode steps, in
how many layers the block(s) holding the key were among the selected far blocks, and their rank
among the predicted candidates per layer (None: not predicted). `force` adds the key's blocks to
every selection: if the answer then becomes right, the selection was at fault, not the reading.
Used to find why remap missed 32K depth 0.9 (docs/positions.md).

Public API only: the selections are seen through ``rt.new_cache(on_selection=...)`` (an
observer that may return a replacement selection, for ``force``); the prompt is answered as
``rt.generate`` does (``rt.fill`` then ``rt.generate_with``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import hkv
from hkv.attention.selection import Selection, SelectionEvent
from hkv.default_model import load_default_model
from hkv.passkey import passkey_answer, passkey_prompt

NEW_TOKENS = 7  # as hkv bench passkey: a space, the 5 digits, one more


def passkey_bench_config(mode: str, store: str, budget: int) -> hkv.Config:
    """The config `hkv bench passkey` gives MODE without --config (hkv/bench/passkey.py,
    passkey_config): 256 MiB device, 2 GiB host, 16 GiB disk, float16 blocks, prefetch off."""
    return hkv.Config.load(hkv.Config.load(), env={},
                           tiers={"device": "256MiB", "host": "2GiB", "disk": "16GiB", "path": store, "dtype": "float16"},
                           attention={"mode": "sparse", "positions": mode, "budget_tokens": budget},
                           prefetch={"enabled": False})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("length", type=int)
    parser.add_argument("depth", type=float)
    parser.add_argument("mode", choices=["original", "remap"])
    parser.add_argument("force", nargs="?", choices=["force"], help="add the key's blocks to every selection")
    parser.add_argument("--budget", type=int, default=2048, help="attention.budget_tokens (the bench's default 2048)")
    args = parser.parse_args()

    model, tok = load_default_model(dtype=torch.float32)
    seed = round(100 * args.depth) + args.length  # as hkv bench passkey, trial 0
    ids, key = passkey_prompt(tok, args.length, args.depth, seed=seed)
    with tempfile.TemporaryDirectory() as store:
        config = passkey_bench_config(args.mode, store, args.budget)
        block = config.attention.block_tokens
        # needle token positions: tokens of the key digits
        keytoks = tok.encode(" " + key, add_special_tokens=False)
        pos = [i for i in range(len(ids) - len(keytoks)) if ids[i : i + len(keytoks)] == keytoks]
        needle_blocks = sorted({p // block for p in pos} | {(p + len(keytoks)) // block for p in pos})
        print("key", key, "tokens", len(ids), "needle at", pos, "blocks", needle_blocks, flush=True)
        records = []

        def observe(event: SelectionEvent) -> Selection | None:
            total = event.query_start + event.queries  # tokens in the layer, the chunk's included
            if total < len(ids) - 8:  # record only the last prefill chunk and the decode steps
                return None
            sel = event.selection
            chosen = set(sel.blocks.tolist())
            pred = sel.predicted.tolist()
            hit = [b in chosen for b in needle_blocks]
            records.append({"layer": event.layer, "total": total, "s": event.queries, "hit": hit,
                            "ranks": {b: (pred.index(b) if b in pred else None) for b in needle_blocks}, "top": pred[:8]})  # fmt: skip
            if args.force and not all(hit) and sel.scored.numel():  # scored: sparse, with more candidates than slots
                blocks = sorted(chosen | {b for b in needle_blocks if b < event.past_blocks})
                return Selection(torch.tensor(blocks), sel.predicted, sel.scored, sel.scores)
            return None

        t = time.time()
        prompt = torch.tensor([ids])
        with hkv.wrap(model, config) as rt, rt.new_cache(on_selection=observe) as cache:
            rt.fill(cache, prompt[0, :-1])
            out = rt.generate_with(cache, prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        reply = out[0, prompt.shape[1] :].tolist()
    ans = passkey_answer(tok, reply)
    print("answer", ans, "correct", ans == key, repr(tok.decode(reply)), f"{time.time() - t:.0f}s", flush=True)
    steps = sorted({r["total"] for r in records})
    for st in steps[:3]:
        rs = [r for r in records if r["total"] == st]
        print(f"step total={st}: layers hitting all needle blocks:", sum(all(r["hit"]) for r in rs), "/", len(rs))
        print("  ranks per layer:", [list(r["ranks"].values()) for r in rs])
        print("  top-8 predicted per layer:", [r["top"] for r in rs])


if __name__ == "__main__":
    main()
