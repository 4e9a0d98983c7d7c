"""Where anonymous RSS goes during a long fill (diagnosis, not a benchmark).

usage: OMP_NUM_THREADS=1 python scripts/heap_probe.py TOKENS     (e.g. 98304; ~40 s)

Fills a write-through sequence with synthetic KV (random SmolLM2-shaped model, device 64 MiB,
host 192 MiB, fp16, sparse remap, prefetch on) and every 16K tokens prints RssAnon / RssFile and
the summaries' bytes, then calls malloc_trim(0) and prints RssAnon again: the difference is
freed heap that malloc kept (hkv/memory.py). Linux + glibc.
"""
import ctypes
import sys, time, tempfile
from pathlib import Path
import torch
from hkv import Config, wrap
from hkv.bench.decode import build_model, synthetic_kv

TOKENS, STEP = int(sys.argv[1]), 16384
def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile", "VmHWM")):
            k, v = line.split(":"); out[k] = int(v.split()[0]) / 1024
    return out
model, _ = build_model("random", max_tokens=TOKENS)
with tempfile.TemporaryDirectory() as d:
    config = Config.load(tiers={"device": "64MiB", "host": "192MiB", "disk": "32GiB", "dtype": "float16", "path": d},
                         attention={"mode": "sparse", "positions": "remap"}, prefetch={"enabled": True}, env={})
    with wrap(model, config) as rt, rt.new_cache(persist=True) as cache:
        c = model.config
        shape = dict(kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=rt.dtype, device="cpu")
        ids = torch.randint(0, c.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(0))
        t0 = time.time()
        for begin in range(0, TOKENS, 1024):
            n = min(1024, TOKENS - begin)
            cache.append_kv(ids[begin:begin + n], lambda layer: synthetic_kv(layer, begin, n, **shape), None)
            if (begin + n) % STEP == 0:
                st = status()
                summ = cache.sequence.summaries.nbytes() / 2**20
                print(f"{begin + n:>8} tok {time.time()-t0:6.0f}s anon {st['RssAnon']:7.0f} MiB file {st['RssFile']:6.0f} MiB summaries {summ:5.0f} MiB", flush=True)
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                st2 = status()
                print(f"          after malloc_trim: anon {st2['RssAnon']:7.0f} MiB", flush=True)
