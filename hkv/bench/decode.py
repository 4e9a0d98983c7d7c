"""Decode latency per token: hkv sparse mode against transformers' ``DynamicCache``.

Both run the same model (SmolLM2-135M's shape: 30 layers, 9 query / 3 KV heads of 64 dims) in the
same process. Prefilling 128K tokens is too slow on a CPU, so both caches are **filled with
synthetic KV** of the right shape, appended per layer without a forward pass (hkv through
``SequenceKV.append``, so blocks are sealed, summarised and placed in the tiers exactly as in a
prefill; the baseline through ``DynamicCache.update``). Keys are a per-head mean direction plus
noise, as real post-RoPE keys have a strong shared component; values are Gaussian. What is
timed is the decode step: one forward of the model for one token, ``steps`` times after a
warm-up, median reported.

Figures: ``hkv_ms`` and ``baseline_ms`` (median ms per token; ``None`` where the baseline's KV
does not fit in RAM), ``hit_rate`` (blocks read that the prefetcher had on the device in time /
unpinned blocks read), ``precision`` (the same hits / blocks predicted, margin included),
``missed_per_step`` (blocks fetched on demand per step), ``stall_frac`` (time attention waited
for blocks that were not on the device / decode time). All over the timed steps only.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config

# SmolLM2-135M-Instruct's shape; max_position_embeddings raised so RoPE covers 128K positions.
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
FILL_CHUNK = 8192  # tokens appended per layer at a time while filling
# hkv's tiers when no config is given: 128K tokens of SmolLM2 KV in fp32 are 6 GiB, so the host
# tier (RAM) holds them and the device tier holds 256 MiB of blocks, as on a GPU with 8 GiB of
# pinned host memory. A config with a smaller host tier sends the rest to disk.
BENCH_TIERS = {"device": "256MiB", "host": "8GiB", "disk": "32GiB"}


def build_model(weights: str = "auto", *, device: str | torch.device = "cpu", max_tokens: int = 131072) -> tuple[torch.nn.Module, str]:
    """``(model, weights used)``: SmolLM2-135M with ``weights="smollm2"`` (the real GGUF, ~25 s to
    load), ``"random"`` (its shape, random weights) or ``"auto"`` (smollm2 if installed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if weights == "auto":
        from ..models import ModelNotInstalledError, default_model_dir

        try:
            default_model_dir()
            weights = "smollm2"
        except ModelNotInstalledError:
            weights = "random"
    if weights == "smollm2":
        from ..models import load_default_model

        model, _ = load_default_model()
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, max_tokens + 64)
    elif weights == "random":
        torch.manual_seed(0)
        config = LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=max_tokens + 64)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"weights = {weights!r}: expected 'auto', 'random' or 'smollm2'")
    return model.to(device).eval(), weights


def synthetic_kv(layer: int, start: int, length: int, *, kv_heads: int, head_dim: int, dtype: torch.dtype, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[kv_heads, length, head_dim]`` of tokens ``start .. start+length`` of ``layer``.

    Deterministic in (layer, start): a per-(layer, head) mean direction plus unit noise for the
    keys, unit Gaussian values.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(1_000_003 * (layer + 1) + start)
    mean = torch.randn(kv_heads, 1, head_dim, generator=torch.Generator().manual_seed(layer)).to(device) * 2.0
    keys = mean + torch.randn(kv_heads, length, head_dim, generator=g, device=device)
    values = torch.randn(kv_heads, length, head_dim, generator=g, device=device)
    return keys.to(dtype), values.to(dtype)


def _kv_bytes(model: torch.nn.Module, tokens: int) -> int:
    c = model.config
    itemsize = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * itemsize * tokens


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return 8 * 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _time_steps(model: torch.nn.Module, cache: Any, steps: int, warmup: int = 2, on_warm: Any = None) -> list[float]:
    """Seconds per decode step (greedy next token), ``steps`` timed after ``warmup``.
    ``on_warm()`` is called once the warm-up steps are done (to snapshot statistics)."""
    device = next(model.parameters()).device
    token = torch.tensor([[1]], device=device)
    times = []
    for i in range(warmup + steps):
        if i == warmup and on_warm is not None:
            on_warm()
        _sync(device)
        start = time.perf_counter()
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _stat(stats: Any, name: str) -> float:
    """A counter of a :class:`~hkv.prefetch.prefetcher.SequenceStats` (0 for no stats yet)."""
    return 0.0 if stats is None else float(getattr(stats, name))


def _hkv_run(model: torch.nn.Module, config: Config, context: int, steps: int, store: Path) -> dict[str, Any]:
    from ..integrations.runtime import wrap

    spec_cfg = model.config
    device = next(model.parameters()).device
    config = Config.load(config, tiers={"path": str(store)}, attention={"mode": "sparse"}, prefetch={"enabled": True})
    with wrap(model, config) as rt:
        cache = rt.new_cache()
        sequence = cache.sequence
        start = time.perf_counter()
        ids = torch.randint(0, spec_cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(context))
        shape = dict(kv_heads=spec_cfg.num_key_value_heads, head_dim=spec_cfg.head_dim, dtype=rt.dtype, device=device)
        for begin in range(0, context, FILL_CHUNK):
            n = min(FILL_CHUNK, context - begin)
            cache.append_kv(ids[begin : begin + n], lambda layer: synthetic_kv(layer, begin, n, **shape), None)
        fill_s = time.perf_counter() - start
        # Prefetch figures over the timed steps only, like the times they are divided by.
        snapshot: dict[str, Any] = {}
        times = _time_steps(model, cache, steps, on_warm=lambda: snapshot.setdefault("before", sequence.stats()))
        before, after = snapshot.get("before"), sequence.stats()
        tiers = rt.stats().tiers
        cache.close()
    predicted = _stat(after, "predicted") - _stat(before, "predicted")
    needed = _stat(after, "needed") - _stat(before, "needed")
    hits = _stat(after, "hit") - _stat(before, "hit")
    missed = _stat(after, "missed") - _stat(before, "missed")
    stall = _stat(after, "stall_s") - _stat(before, "stall_s")
    median = statistics.median(times)
    return {
        "ms": 1000 * median,
        "fill_s": fill_s,
        "hit_rate": hits / needed if needed else None,
        "precision": hits / predicted if predicted else None,
        "missed_per_step": missed / steps,
        "stall_frac": stall / sum(times) if times else None,
        "tiers": tiers,
    }


def _baseline_run(model: torch.nn.Module, context: int, steps: int) -> dict[str, Any]:
    from transformers import DynamicCache

    c = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=c)
    start = time.perf_counter()
    for layer in range(c.num_hidden_layers):
        parts_k, parts_v = [], []
        for begin in range(0, context, FILL_CHUNK):
            k, v = synthetic_kv(layer, begin, min(FILL_CHUNK, context - begin), kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=dtype, device=device)
            parts_k.append(k)
            parts_v.append(v)
        cache.update(torch.cat(parts_k, 1)[None], torch.cat(parts_v, 1)[None], layer)
        del parts_k, parts_v
    fill_s = time.perf_counter() - start
    times = _time_steps(model, cache, steps)
    del cache
    gc.collect()
    return {"ms": 1000 * statistics.median(times), "fill_s": fill_s}


def run_decode_bench(
    config: Config | None = None,
    *,
    contexts: tuple[int, ...] = (8192, 32768, 131072),
    steps: int = 16,
    weights: str = "auto",
    device: str | torch.device | None = None,
    baseline: bool = True,
    ram_fraction: float = 0.6,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Decode latency per token of hkv sparse mode and of ``DynamicCache`` at each context length.

    ``config``: hkv's config (its attention/tier settings; mode is forced to sparse, prefetch
    on, and the disk store goes to a temporary folder); None: defaults with :data:`BENCH_TIERS`.
    ``weights``: "smollm2" (the real model, so decode queries are realistic), "random"
    (SmolLM2's shape) or "auto" (smollm2 when installed). ``device``: default cuda if available, else cpu.
    The baseline is skipped (``None``) where its KV would exceed ``ram_fraction`` of free RAM
    (or of free GPU memory on cuda). ``model``: an already built model (from :func:`build_model`,
    on ``device``) to reuse across calls instead of building one; ``weights`` then only labels it.
    Returns a dict with at least ``contexts``, ``hkv_ms``,
    ``baseline_ms``, ``hit_rate``, ``stall_frac``.
    """
    if steps < 1:
        raise ValueError(f"steps = {steps} must be at least 1")
    config = config if config is not None else Config.load(tiers=BENCH_TIERS)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model is None:
        model, weights = build_model(weights, device=device, max_tokens=max(contexts))
    elif next(model.parameters()).device.type != device.type:
        raise ValueError(f"the model is on {next(model.parameters()).device}, the benchmark runs on {device}")
    figures: dict[str, Any] = {
        "contexts": list(contexts),
        "hkv_ms": [],
        "baseline_ms": [],
        "hit_rate": [],
        "stall_frac": [],
        "precision": [],
        "missed_per_step": [],
        "hkv_fill_s": [],
        "baseline_fill_s": [],
        "tiers": [],
        "steps": steps,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "model": f"SmolLM2-135M shape ({weights} weights), {next(model.parameters()).dtype}",
        "fill": "synthetic KV appended per layer without a prefill (keys: per-head mean + noise; values: Gaussian)",
        "timed": "one decode forward per token (median of steps after 2 warm-up steps)",
        "hkv_config": {k: v for k, v in config.as_dict().items() if k in ("tiers", "attention", "prefetch")},
    }
    for context in contexts:
        store = Path(tempfile.mkdtemp(prefix="hkv-bench-"))
        try:
            run = _hkv_run(model, config, context, steps, store)
        finally:
            shutil.rmtree(store, ignore_errors=True)
        gc.collect()
        figures["hkv_ms"].append(run["ms"])
        figures["hit_rate"].append(run["hit_rate"])
        figures["stall_frac"].append(run["stall_frac"])
        figures["precision"].append(run["precision"])
        figures["missed_per_step"].append(run["missed_per_step"])
        figures["hkv_fill_s"].append(run["fill_s"])
        figures["tiers"].append({name: usage for name, usage in run["tiers"].items()})
        need = _kv_bytes(model, context) * 2  # the cache plus one concatenated copy per step
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_ram()
        if baseline and need <= ram_fraction * free:
            base = _baseline_run(model, context, steps)
            figures["baseline_ms"].append(base["ms"])
            figures["baseline_fill_s"].append(base["fill_s"])
        else:
            figures["baseline_ms"].append(None)
            figures["baseline_fill_s"].append(None)
        gc.collect()
    hkv = figures["hkv_ms"]
    figures["hkv_growth"] = hkv[-1] / hkv[0] if len(hkv) > 1 else None
    base_last = figures["baseline_ms"][-1]
    figures["speedup_at_max"] = base_last / hkv[-1] if base_last else None
    return figures


def print_table(figures: dict[str, Any]) -> None:
    """The figures as a table on stdout."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"decode latency per token, {figures['model']} on {figures['device']} ({figures['threads']} threads)")
    print(f"KV: {figures['fill']}; timed: {figures['timed']}")
    print(f"{'context':>9} {'hkv ms':>9} {'Dynamic ms':>11} {'speedup':>8} {'hit rate':>9} {'miss/step':>10} {'stall':>7}")
    for i, context in enumerate(figures["contexts"]):
        hkv, base = figures["hkv_ms"][i], figures["baseline_ms"][i]
        speed = base / hkv if base else None
        print(
            f"{context:>9} {fmt(hkv, '9.2f')} {fmt(base, '11.2f')} {fmt(speed, '7.1f') + ('x' if speed else ''):>8} "
            f"{fmt(figures['hit_rate'][i], '9.1%')} {fmt(figures.get('missed_per_step', [None] * (i + 1))[i], '10.0f')} "
            f"{fmt(figures['stall_frac'][i], '7.1%')}"
        )
    if figures.get("hkv_growth") is not None:
        print(f"hkv latency at {figures['contexts'][-1]} / at {figures['contexts'][0]}: {figures['hkv_growth']:.2f}x")
