"""Where anonymous RSS goes during a long fill (diagnosis, not a benchmark).

usage: OMP_NUM_THREADS=1 python scripts/heap_probe.py TOKENS [--every 16384]     (e.g. 98304; ~40 s)

Fills a write-through sequence with synthetic KV (random SmolLM2-shaped model, device 64 MiB,
host 192 MiB, fp16, sparse remap, prefetch on) and every 16K tokens (``--every``) prints RssAnon
/ RssFile and the summaries' bytes, then calls malloc_trim(0) and prints RssAnon again: the
difference is freed heap that malloc kept (hkv/memory.py). Linux + glibc.

Public API only: ``hkv.wrap``, ``rt.new_cache(persist=True)`` and the cache's ``append_kv`` (KV
appended without a forward, as the benchmarks fill long contexts).
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import time

import torch

import hkv

# SmolLM2-135M-Instruct's shape (hkv's default model), random weights: only the KV's shape matters here.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)  # fmt: skip
CHUNK = 1024  # tokens appended per call
DTYPE = torch.float16  # tiers.dtype below


def status() -> dict[str, float]:
    """RssAnon, RssFile and VmHWM of this process, MiB."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon", "RssFile", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out


def synthetic_kv(layer: int, start: int, length: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (a per-layer mean direction plus noise, like post-RoPE keys) and values ``[kv_heads, length, head_dim]``."""
    g = torch.Generator().manual_seed(1_000_003 * (layer + 1) + start)
    mean = torch.randn(kv_heads, 1, head_dim, generator=torch.Generator().manual_seed(layer)) * 2.0
    keys = mean + torch.randn(kv_heads, length, head_dim, generator=g)
    return keys.to(DTYPE), torch.randn(kv_heads, length, head_dim, generator=g).to(DTYPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokens", type=int)
    parser.add_argument("--every", type=int, default=16384, help="tokens between samples (a multiple of 1024)")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=args.tokens + 64)
    model = LlamaForCausalLM(c).eval()
    # the summaries: fp32 min and max per block, KV head and dim, every layer (64-token blocks)
    summary_bytes_per_block = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    libc = ctypes.CDLL("libc.so.6")
    with tempfile.TemporaryDirectory() as d:
        config = hkv.Config.load(tiers={"device": "64MiB", "host": "192MiB", "disk": "32GiB", "dtype": "float16", "path": d},
                                 attention={"mode": "sparse", "positions": "remap"}, prefetch={"enabled": True}, env={})  # fmt: skip
        block = config.attention.block_tokens
        with hkv.wrap(model, config) as rt, rt.new_cache(persist=True) as cache:
            ids = torch.randint(0, c.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
            t0 = time.time()
            for begin in range(0, args.tokens, CHUNK):
                n = min(CHUNK, args.tokens - begin)
                cache.append_kv(ids[begin : begin + n], lambda layer: synthetic_kv(layer, begin, n, c.num_key_value_heads, c.head_dim))
                if (begin + n) % args.every == 0:
                    st = status()
                    summ = (begin + n) // block * summary_bytes_per_block / 2**20
                    print(f"{begin + n:>8} tok {time.time() - t0:6.0f}s anon {st['RssAnon']:7.0f} MiB file {st['RssFile']:6.0f} MiB "
                          f"summaries {summ:5.0f} MiB", flush=True)  # fmt: skip
                    libc.malloc_trim(0)
                    print(f"          after malloc_trim: anon {status()['RssAnon']:7.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
