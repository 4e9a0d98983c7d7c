"""The methods the peers benchmark runs in this environment, and how it measures them.

``hkv sparse`` / ``hkv exact`` through hkv's public API only (:func:`hkv.wrap`, ``rt.new_cache``,
``rt.fill``, ``rt.stats``; the cache is passed to the model's own forward), and transformers'
``DynamicCache``, ``QuantizedCache`` (fp8) and sliding-window cache. Every method answers the
turns with :func:`answer_turns`, the loop the kvpress presses run in their virtualenv
(:mod:`.child`), so positions and timing are the same for all.
"""

from __future__ import annotations

import copy
import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import hkv
from peers.child import peak_rss_bytes, reset_peak_rss  # the same measure on both sides

DEVICE_FRACTION = 0.25  # memory given to every bounded method, a fraction of the context's full KV
LOCAL_METHODS = ("hkv sparse", "hkv exact", "DynamicCache", "QuantizedCache fp8", "SlidingWindow")


# -- measuring ---------------------------------------------------------------------------------


def cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a transformers cache holds (full precision, quantized and scales)."""

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.nbytes
        if isinstance(value, (tuple, list)):
            return sum(size(v) for v in value)
        return 0

    names = ("keys", "values", "_quantized_keys", "_quantized_values")
    return sum(size(getattr(layer, name, None)) for layer in cache.layers for name in names)


def full_kv_bytes(model: torch.nn.Module, tokens: int) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size() * tokens


def answer_turns(model: torch.nn.Module, cache: Any, context_len: int, turns: list[dict]) -> tuple[list[list[int]], list[float]]:
    """:func:`.child.answer_turns` (the loop the peers run in their venv) with this transformers'
    ``cache=`` keyword: the same turns, positions and timing for every method."""
    from .child import answer_turns as child_answer_turns

    return child_answer_turns(model, cache, context_len, turns, cache_kwarg="cache")


def record(prompt: dict, method: str, generated: list, steps: list, kv_device: int, kv_total: int, rss: int, prefill_s: float) -> dict:
    """One answered prompt, as the JSON's ``records`` hold it."""
    return {"id": prompt["id"], "task": prompt["task"], "method": method, "generated": generated, "step_s": steps,
            "kv_device_bytes": kv_device, "kv_total_bytes": kv_total, "peak_rss_bytes": rss, "prefill_s": prefill_s}  # fmt: skip


# -- hkv ---------------------------------------------------------------------------------------


def hkv_config(mode: str, context_tokens: int, kv_bytes: int, store: Path) -> hkv.Config:
    """hkv's config at the shared budget: device tier = DEVICE_FRACTION of the context's KV."""
    block = 64 if context_tokens >= 1024 else 8  # small blocks for the smoke test's short prompts
    sink, local = block, 4 * block
    budget = max(sink + local + block, int(DEVICE_FRACTION * context_tokens) // block * block)
    return hkv.Config.load({
        "tiers": {"device": int(DEVICE_FRACTION * kv_bytes), "host": kv_bytes // 2, "disk": max(4 * kv_bytes, 2**28), "path": str(store)},
        "attention": {"mode": mode, "block_tokens": block, "budget_tokens": budget, "sink_tokens": sink, "local_tokens": local,
                      "prefill_chunk_tokens": max(block, min(1024, context_tokens // 4 // block * block))},
        "prefetch": {"enabled": True},
    }, env={})  # fmt: skip  (every method gets the same budget: no HKV_* override)


def run_hkv(model: torch.nn.Module, prompts: list[dict], mode: str) -> list[dict]:
    """hkv ``mode`` (sparse / exact) on ``prompts``, one runtime over a fresh temporary store.

    The context goes in with ``rt.fill`` (a fresh store holds no prefix to adopt, so it is all
    prefilled), the turns with :func:`answer_turns` on the same cache; ``rt.stats()`` gives the
    device tier's peak and the bytes in every tier while the sequence is alive."""
    context_tokens = max(len(p["context"]) for p in prompts)
    store = Path(tempfile.mkdtemp(prefix="hkv-peers-"))
    records = []
    try:
        with hkv.wrap(model, hkv_config(mode, context_tokens, full_kv_bytes(model, context_tokens), store)) as rt:
            for prompt in prompts:
                with rt.new_cache() as cache:
                    start = time.perf_counter()
                    rt.fill(cache, torch.tensor(prompt["context"]), progress=False)
                    prefill_s = time.perf_counter() - start
                    gc.collect()
                    reset_peak_rss()
                    generated, steps = answer_turns(model, cache, len(prompt["context"]), prompt["turns"])
                    rss = peak_rss_bytes()
                    stats = rt.stats()
                total = sum(t["used_bytes"] for t in stats.tiers.values())
                records.append(record(prompt, f"hkv {mode}", generated, steps, stats.device_peak_bytes, total, rss, prefill_s))
    finally:
        shutil.rmtree(store, ignore_errors=True)
    return records


# -- transformers' caches ----------------------------------------------------------------------


def run_transformers(model: torch.nn.Module, prompts: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """DynamicCache, QuantizedCache (fp8) and the sliding window, from one full prefill per prompt."""
    from transformers import DynamicCache, QuantizedCache

    records = []
    for prompt in prompts:
        n = len(prompt["context"])
        full = DynamicCache(config=model.config)
        start = time.perf_counter()
        with torch.inference_mode():
            model.model(input_ids=torch.tensor([prompt["context"]]), cache=full, use_cache=True)
        prefill_s = time.perf_counter() - start
        runs: list[tuple[str, Any]] = []
        if "DynamicCache" in methods:
            gc.collect()
            reset_peak_rss()
            generated, steps = answer_turns(model, full, n, prompt["turns"])
            size = cache_bytes(full)
            records.append(record(prompt, "DynamicCache", generated, steps, size, size, peak_rss_bytes(), prefill_s))
            full.crop(n - full.get_seq_length())  # back to the context (a negative count removes tokens)
        if "SlidingWindow" in methods:
            config = copy.deepcopy(model.config)
            config.sliding_window = max(2, int(DEVICE_FRACTION * n))
            config.layer_types = ["sliding_attention"] * config.num_hidden_layers
            window = DynamicCache(config=config)
            for i, layer in enumerate(full.layers):
                window.layers[i].update(layer.keys, layer.values)
                window.layers[i].keys = window.layers[i].keys.clone()  # not a view of the full prefill
                window.layers[i].values = window.layers[i].values.clone()
            runs.append(("SlidingWindow", window))
        if "QuantizedCache fp8" in methods:
            quantized = QuantizedCache(backend="fp8", config=model.config)
            for i, layer in enumerate(full.layers):
                quantized.layers[i].update(layer.keys, layer.values)
            runs.append(("QuantizedCache fp8", quantized))
        del full
        while runs:
            name, cache = runs.pop(0)
            gc.collect()
            reset_peak_rss()
            generated, steps = answer_turns(model, cache, n, prompt["turns"])
            size = cache_bytes(cache)
            records.append(record(prompt, name, generated, steps, size, size, peak_rss_bytes(), prefill_s))
            del cache
    return records
