"""Tier budgets from a config file, with overrides, on a tiny random Llama (no download, seconds on a CPU).

    python examples/tune_budgets.py
    HKV_TIERS__HOST=16KiB python examples/tune_budgets.py     # a smaller host tier: more blocks on disk
    HKV_PREFETCH__ENABLED=true python examples/tune_budgets.py # prefetch on (million.toml turns it off)

It loads examples/million.toml (the 1M-token SmolLM2 config), shrinks its budgets to a few
blocks of this model with keyword overrides (HKV_* variables still win over both), generates
from a 600-token prompt, and prints the tier occupancy and prefetch figures of rt.stats() while
the sequence is live: the prompt's KV does not fit on the device, so blocks spill to host and
disk. See docs/tuning.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hkv
from hkv.integrations.runtime import RuntimeStats

BLOCK = 16  # tokens per block; the tiny model's block is 2 x 2 kv heads x 16 tokens x 16 dims x fp16 = 2,048 bytes
KIB = 1024


def tiny_llama() -> torch.nn.Module:
    """2 layers, 4 query heads, 2 KV heads, head_dim 16, random weights, fp32 on the CPU."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def load_config(store: Path) -> hkv.Config:
    """million.toml, then keyword overrides (by section), then HKV_<SECTION>__<KEY> variables."""
    return hkv.Config.load(
        Path(__file__).with_name("million.toml"),
        tiers={"device": "32KiB", "host": "64KiB", "disk": "4MiB", "path": str(store)},  # 16 and 32 blocks of 2 KiB
        attention={"block_tokens": BLOCK, "sink_tokens": BLOCK, "local_tokens": 2 * BLOCK,
                   "budget_tokens": 6 * BLOCK, "prefill_chunk_tokens": 64},  # fmt: skip
    )


def report(rt: hkv.Runtime) -> list[str]:
    """rt.stats() as lines: occupancy per tier, bytes moved, prefetch hit rate, stall time and the blocks read."""
    stats = rt.stats()
    lines = ["tier      used / capacity      blocks"]
    for name, tier in stats.tiers.items():
        used, capacity = tier["used_bytes"], tier["capacity_bytes"]
        lines.append(f"{name:<7} {used / KIB:7.1f} / {capacity / KIB:7.1f} KiB {100 * used / capacity:5.1f}%  {tier['blocks']:4d}")
    lines.append("moved:   " + ", ".join(f"{way} {n / KIB:.0f} KiB" for way, n in stats.moved_bytes.items() if n))
    lines.append("evicted: " + ", ".join(f"{tier} {n}" for tier, n in stats.evictions.items()))
    p = stats.prefetch
    if rt.prefetcher is None:  # million.toml turns prefetch off (2-core CPUs); HKV_PREFETCH__ENABLED=true turns it on
        head = "off (prefetch.enabled = false, so no hit rate)"
    else:
        rate = f"{100 * p.hit_rate:.0f}%" if p.hit_rate is not None else "-"
        head = f"hit rate {rate} ({p.hit}/{p.needed} blocks read beyond the pinned ones)"
    lines.append(f"prefetch: {head}, stall {p.stall_s:.3f} s over {p.step} steps")
    # every block read in one bucket: read = pinned + hit + unpredicted + waited + fetched
    lines.append(f"reads:   {p.read} blocks = {p.pinned} pinned + {p.hit} predicted, on the device in time + "
                 f"{p.unpredicted} on the device, not predicted + {p.waited} waited for + {p.fetched} fetched on demand")  # fmt: skip
    return lines


def main(store: Path, prompt_tokens: int = 600, new_tokens: int = 16) -> RuntimeStats:
    config = load_config(store)
    model = tiny_llama()
    prompt = torch.randint(0, 256, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    with hkv.wrap(model, config) as rt:
        per_token = rt.spec.num_layers * rt.layout.nbytes // BLOCK  # bytes of KV per token, all layers
        print(f"block: {rt.layout.describe()}; KV per token {per_token} bytes; "
              f"{prompt_tokens} tokens = {prompt_tokens * per_token / KIB:.1f} KiB")  # fmt: skip
        with rt.new_cache() as cache:  # stats while the sequence is live: closing it drops its disk spill
            out = model.generate(prompt, cache=cache, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
            print(f"generated {out.shape[1] - prompt_tokens} tokens after {prompt_tokens}")
            print("\n".join(report(rt)))
            return rt.stats()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        main(Path(folder) / "store")
