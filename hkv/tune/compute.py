"""The compute term of `hkv tune`'s cost model: a decode step, measured, not estimated.

For a model in sparse mode it is hkv's own step with every block on the device
(:func:`hkv_step_ms`): the model's layers, selection, hkv's bookkeeping and the attention over
the budget. Timing the model with transformers' cache instead (:func:`model_step_ms`, kept for
exact mode) left hkv's per-layer host time out of the prediction: on an H200 that made `hkv
tune` predict 19.8 ms for an 8K step measured at 48.6 ms (docs/benchmarks.md)."""

from __future__ import annotations

import statistics
import time

import torch

from ..config import Config
from .plan import ModelShape


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_step_ms(model: torch.nn.Module, tokens: int, *, steps: int = 5) -> float:
    """Median milliseconds of one greedy decode step of ``model`` with transformers'
    DynamicCache holding ``tokens`` tokens of random KV (what a sparse hkv step computes over
    ``budget_tokens``, without hkv's own work)."""
    from transformers import DynamicCache

    shape = ModelShape.of(model)
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    gen = torch.Generator(device=device).manual_seed(0)
    for layer in range(shape.layers):
        k, v = (torch.randn(1, shape.kv_heads, tokens, shape.head_dim, generator=gen, device=device, dtype=shape.dtype) for _ in "kv")
        cache.update(k, v, layer)
    token = torch.tensor([[1]], device=device)
    times = []
    with torch.inference_mode():
        for i in range(steps + 2):  # two warm-up steps
            _sync(device)
            start = time.perf_counter()
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def hkv_step_ms(model: torch.nn.Module, config: Config, tokens: int, *, steps: int = 5) -> float:
    """Median milliseconds of hkv's decode step (sparse, ``config``'s attention settings and
    storage dtype) over ``tokens`` tokens of synthetic KV that all stay on the device, prefetch
    off: what a step costs when no block has to move (:func:`hkv.bench.decode.run_decode_bench`
    without its baseline, in a temporary store). Pass about twice ``attention.budget_tokens``,
    so that selection scores and chooses blocks as it does at any longer context."""
    from ..bench.decode import run_decode_bench, storage_kv_bytes

    device = next(model.parameters()).device
    kv_bytes = storage_kv_bytes(model.config, config, tokens, next(model.parameters()).dtype)
    room = 2 * kv_bytes + (64 << 20)  # every block and its copies during the step, with room to spare
    run_config = Config.load(config, env={}, tiers={"device": room, "host": room}, prefetch={"enabled": False})  # the bench runs sparse
    figures = run_decode_bench(run_config, contexts=(tokens,), steps=steps, device=device, baseline=False, model=model,
                               weights="given")  # fmt: skip
    return float(figures["hkv_ms"][0])


def attention_step_ms(shape: ModelShape, tokens: int, device: torch.device, *, steps: int = 5) -> float:
    """Median milliseconds of one decode step's attention alone (every layer, one query over
    ``tokens`` keys): the compute term for a bare shape, which has no weights to time."""
    dtype = shape.dtype if device.type == "cuda" else torch.float32  # a CPU model computes in fp32
    q = torch.randn(1, shape.q_heads, 1, shape.head_dim, device=device, dtype=dtype)
    k = torch.randn(1, shape.q_heads, tokens, shape.head_dim, device=device, dtype=dtype)
    times = []
    for i in range(steps + 2):
        _sync(device)
        start = time.perf_counter()
        for _ in range(shape.layers):
            torch.nn.functional.scaled_dot_product_attention(q, k, k)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
