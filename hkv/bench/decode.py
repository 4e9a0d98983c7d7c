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
for blocks that were not on the device / decode time), ``host_ms_per_layer`` (hkv's own time
per layer and step outside the kernels that read the step's bytes and outside stalls:
:attr:`~hkv.attention.stats.StepStats.host_s`) and ``layer_ms`` (per layer and step: attend,
append, kernel, select, stall). All over the timed steps only.
Memory and placement: ``tier_bytes`` (bytes per tier once the fill is done: every block in
exactly one tier; the disk's count 64-byte record headers; ``tiers`` is the same after decode,
when blocks read from below also have a copy above), ``kv_bytes`` (the KV in the storage dtype),
``rss_peak_bytes`` (resident set sampled every 50 ms during hkv's fill and decode, see
:mod:`hkv.bench.rss`), ``rss_lifetime_peak_bytes`` (``ru_maxrss`` before the baseline runs:
with ``isolate`` a fresh process per context, model and imports included),
``rss_teardown_peak_bytes`` (sampled from the runtime's creation to its close), ``rss_limit_bytes``
(device + host budgets + 2 GiB, issue 5's bound).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config, cpu_cores
from .disk import drop_store_pages
from .smollm2 import build_model, synthetic_kv

GiB = 2**30
FILL_CHUNK = 8192  # tokens appended per layer at a time while filling
# hkv's tiers when no config is given: 128K tokens of SmolLM2 KV in fp32 are 6 GiB, so the host
# tier (RAM) holds them and the device tier holds 256 MiB of blocks, as on a GPU with 8 GiB of
# pinned host memory. A config with a smaller host tier sends the rest to disk.
BENCH_TIERS = {"device": "256MiB", "host": "8GiB", "disk": "32GiB"}
# Issue 5's run ("--preset million"): 8K, 512K and 1M tokens with device 1 GiB, host 4 GiB and
# the rest on disk; blocks stored in float16 (half the bytes of the fp32 model's KV: 22.5 KiB per
# token, 22.5 GiB at 1M); each context in a fresh process (its own ru_maxrss); DynamicCache
# only where its fp32 KV is at most 8 GiB (about 186K tokens of SmolLM2).
MILLION_PRESET: dict[str, Any] = {
    "contexts": (8192, 524288, 1048576),
    "tiers": {"device": "1GiB", "host": "4GiB", "dtype": "float16"},
    "baseline_max_bytes": 8 * 2**30,
    "isolate": True,
}


def bench_options(
    config: Config | None,
    *,
    preset: str | None = None,
    contexts: tuple[int, ...] | None = None,
    device_budget: str | int | None = None,
    host_budget: str | int | None = None,
    disk_budget: str | int | None = None,
    dtype: str | None = None,
    baseline_max_bytes: int | None = None,
    isolate: bool | None = None,
    disk_encoding: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of :func:`run_decode_bench` (``config``, ``contexts``,
    ``baseline_max_bytes``, ``isolate``) from the command's options: ``preset`` ("million":
    :data:`MILLION_PRESET`) first, then the explicit options over it. Tier options apply over
    ``config`` (or :data:`BENCH_TIERS` without one); with none given, ``config`` is returned as
    is (None: the benchmark's defaults). Raises ConfigError for a bad budget or dtype."""
    if preset not in (None, "million"):
        raise ValueError(f"preset = {preset!r}: expected 'million' or none")
    base: dict[str, Any] = dict(MILLION_PRESET) if preset == "million" else {}
    tiers = dict(base.get("tiers", {}))
    for name, value in (("device", device_budget), ("host", host_budget), ("disk", disk_budget), ("dtype", dtype),
                        ("disk_encoding", disk_encoding)):  # fmt: skip
        if value is not None:
            tiers[name] = value
    if tiers:
        start = config if config is not None else Config.load(tiers=BENCH_TIERS)
        config = Config.load(start, env={}, tiers=tiers)  # HKV_* already applied to start: the options win
    return {
        "config": config,
        "contexts": tuple(contexts) if contexts else tuple(base.get("contexts", (8192, 32768, 131072))),
        "baseline_max_bytes": baseline_max_bytes if baseline_max_bytes is not None else base.get("baseline_max_bytes"),
        "isolate": isolate if isolate is not None else base.get("isolate", False),
    }


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


def _graph_counts(sequence: Any) -> dict[str, Any] | None:
    """The sequence's CUDA graph captures and replays and why they were turned off, if they were
    (:class:`~hkv.attention.decode_graphs.DecodeGraphs`); None where it has none (no GPU)."""
    graphs = sequence.graphs
    if graphs is None:
        return None
    return {"captures": graphs.captures, "replays": graphs.replays, "failure": graphs.failure}


@torch.inference_mode()
def _time_steps(model: torch.nn.Module, cache: Any, steps: int, warmup: int = 2, on_warm: Any = None,
                before_step: Any = None) -> list[float]:  # fmt: skip
    """Seconds per decode step (greedy next token), ``steps`` timed after ``warmup``.
    ``on_warm()`` is called once the warm-up steps are done (to snapshot statistics);
    ``before_step()`` before every step, untimed."""
    device = next(model.parameters()).device
    token = torch.tensor([[1]], device=device)
    times = []
    for i in range(warmup + steps):
        if i == warmup and on_warm is not None:
            on_warm()
        if before_step is not None:
            before_step()
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


def storage_kv_bytes(model_config: Any, config: Config, tokens: int, model_dtype: torch.dtype) -> int:
    """Bytes of ``tokens`` tokens of KV in hkv's storage dtype (``tiers.dtype``, "auto" = the model's)."""
    from ..blocks import DTYPE_NAMES

    c = model_config
    dtype = model_dtype if config.tiers.dtype == "auto" else DTYPE_NAMES[config.tiers.dtype]
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.empty(0, dtype=dtype).element_size() * tokens


def _disk_budget(config: Config, kv_bytes: int) -> int:
    """The disk budget for a run: the config's, raised to the KV's bytes + 2% (64-byte record
    headers are 0.13%) + 1 GiB where that is smaller, so the whole KV can spill to disk."""
    return max(int(config.tiers.disk), int(kv_bytes * 1.02) + GiB)


def _hkv_run(model: torch.nn.Module, config: Config, context: int, steps: int, store: Path, *,
             drop_pages: bool = False, warmup: int = 2) -> dict[str, Any]:  # fmt: skip
    """hkv at one context: fill, then ``steps`` timed decode steps. ``drop_pages``: the store's
    files (``data.mdb`` and the segment files) are dropped from the page cache after the fill
    and its block records (the segment files) again before every step, untimed
    (``posix_fadvise``), so every step's disk reads are cold (the index stays as warm as use
    makes it)."""
    from ..integrations.runtime import wrap
    from .rss import RssSampler, rss_bytes

    spec_cfg = model.config
    device = next(model.parameters()).device
    kv_bytes = storage_kv_bytes(spec_cfg, config, context, next(model.parameters()).dtype)
    tiers = {"path": str(store), "disk": _disk_budget(config, kv_bytes)}
    # env={}: HKV_* were applied when config was made; again here, HKV_TIERS__PATH would send the KV to the user's store
    config = Config.load(config, env={}, tiers=tiers, attention={"mode": "sparse"})
    rss_start = rss_bytes()
    whole_rss = RssSampler().start()  # fill, decode and teardown (stats, closing cache and runtime)
    fill_rss = RssSampler().start()
    with wrap(model, config) as rt:
        cache = rt.new_cache()
        sequence = cache.sequence
        start = time.perf_counter()
        ids = torch.randint(0, spec_cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(context))
        shape = dict(kv_heads=spec_cfg.num_key_value_heads, head_dim=spec_cfg.head_dim, dtype=rt.dtype, device=device)
        # One chunk of one layer at a time: synthetic_kv makes [Hkv, FILL_CHUNK, D] and append_kv
        # seals it into the tiers before the next layer's is made, so the fill holds no whole KV.
        for begin in range(0, context, FILL_CHUNK):
            n = min(FILL_CHUNK, context - begin)
            cache.append_kv(ids[begin : begin + n], lambda layer: synthetic_kv(layer, begin, n, **shape), None)
        rt.manager.flush()  # disk writes durable: the fill time includes them
        fill_s = time.perf_counter() - start
        if drop_pages:
            drop_store_pages(store)
        filled = rt.stats().tiers  # where the KV lives before decode copies blocks up
        fill_peak = fill_rss.stop()
        # Prefetch figures over the timed steps only, like the times they are divided by.
        snapshot: dict[str, Any] = {}
        with RssSampler() as decode_rss:
            times = _time_steps(model, cache, steps, warmup, on_warm=lambda: snapshot.update(before=sequence.stats(), moved=rt.stats().moved_bytes),
                                before_step=(lambda: drop_store_pages(store, records_only=True)) if drop_pages else None)  # fmt: skip
        before, after = snapshot.get("before"), sequence.stats()
        stats = rt.stats()
        disk_bytes = stats.moved_bytes.get("disk->host", 0) - snapshot.get("moved", {}).get("disk->host", 0)
        cache.close()
    whole_peak = whole_rss.stop()
    predicted = _stat(after, "predicted") - _stat(before, "predicted")
    needed = _stat(after, "needed") - _stat(before, "needed")
    hits = _stat(after, "hit") - _stat(before, "hit")
    missed = _stat(after, "missed") - _stat(before, "missed")
    stall = _stat(after, "stall_s") - _stat(before, "stall_s")
    layer_steps = steps * spec_cfg.num_hidden_layers
    host = {name: (_stat(after, name) - _stat(before, name)) / layer_steps
            for name in ("attend_s", "append_s", "kernel_s", "select_s", "stall_s")}  # fmt: skip
    host_s = max(0.0, host["attend_s"] + host["append_s"] - host["kernel_s"] - host["stall_s"])  # StepStats.host_s
    median = statistics.median(times)
    peak = {name: max(fill_peak[name], decode_rss.peak[name]) for name in fill_peak}
    return {
        "ms": 1000 * median,
        "fill_s": fill_s,
        "hit_rate": hits / needed if needed else None,
        "precision": hits / predicted if predicted else None,
        "missed_per_step": missed / steps,
        # blocks read from disk in the timed steps, per step, and as a share of the blocks read (pinned ones excluded)
        "disk_blocks_per_step": disk_bytes / rt.manager.layout.nbytes / steps,
        "disk_share": disk_bytes / rt.manager.layout.nbytes / needed if needed else None,
        "stall_frac": stall / sum(times) if times else None,
        # layer reads selected and read on the device through the block tables (every block resident)
        "table_read_frac": (_stat(after, "table_reads") - _stat(before, "table_reads")) / layer_steps,
        # on a GPU: the resident reads' CUDA graphs over the whole run (fill included), None elsewhere
        "cuda_graphs": _graph_counts(sequence),
        "host_ms_per_layer": 1000 * host_s,
        "layer_ms": {name[:-2]: 1000 * value for name, value in host.items()},
        "tiers": stats.tiers,
        "tiers_after_fill": filled,
        "moved_bytes": stats.moved_bytes,
        "kv_bytes": kv_bytes,
        "disk_budget": tiers["disk"],
        "rss": {"start": rss_start["rss"], "fill_peak": fill_peak["rss"], "decode_peak": decode_rss.peak["rss"],
                "peak": peak["rss"], "peak_anon": peak["anon"], "peak_file": peak["file"], "with_teardown": whole_peak["rss"]},
    }


def _baseline_run(model: torch.nn.Module, context: int, steps: int, *, offloading: bool = False) -> dict[str, Any]:
    from transformers import DynamicCache

    c = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with _fastest_sdpa(device):
        return _fill_and_time(model, DynamicCache(config=c, offloading=offloading), context, steps, device, dtype)


def _fastest_sdpa(device: torch.device) -> Any:
    """On CUDA, sdpa without its cuDNN backend: in torch 2.11 on an H200 that backend plans each
    new KV length anew (about 2 ms of host time per call, 60 ms a step of SmolLM2 in fp16, in the
    ``profile`` stage of scripts/gpu_check.sh at f8cef4b, before this function), while flash /
    memory-efficient attention take microseconds; the baseline gets its fastest backend.
    Elsewhere nothing changes."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _fill_and_time(model: torch.nn.Module, cache: Any, context: int, steps: int, device: torch.device,
                   dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """Fill a transformers cache with the synthetic KV and time ``steps`` decode steps."""
    c = model.config
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


def run_offloaded_baseline(model: torch.nn.Module, context: int, steps: int = 8) -> dict[str, Any]:
    """transformers' own offloaded cache (``DynamicCache(offloading=True)``: every layer's KV in
    CPU memory but the one in use, the next layer's copied up while the current one computes),
    filled with the same synthetic KV as the ``DynamicCache`` baseline; ``ms`` (median step) and
    ``fill_s``. Meant for a GPU (on a CPU there is nothing to offload to)."""
    return _baseline_run(model, context, steps, offloading=True)


def _context_run(model: torch.nn.Module, config: Config, context: int, steps: int, *, baseline: bool,
                 ram_fraction: float, baseline_max_bytes: int | None, store_dir: Path | None) -> dict[str, Any]:
    """hkv, then the baseline where it fits, at one context length."""
    from .rss import lifetime_peak_bytes

    device = next(model.parameters()).device
    if store_dir is not None:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="hkv-bench-", dir=store_dir))
    try:
        run = _hkv_run(model, config, context, steps, store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    gc.collect()
    run["rss"]["lifetime_peak"] = lifetime_peak_bytes()  # before the baseline runs
    kv = _kv_bytes(model, context)
    need = kv * 2  # the cache plus one concatenated copy per step
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_ram()
    run["baseline_skipped"] = None
    if not baseline:
        run["baseline_skipped"] = "not run"
    elif baseline_max_bytes is not None and kv > baseline_max_bytes:
        run["baseline_skipped"] = f"KV {kv / GiB:.1f} GiB > {baseline_max_bytes / GiB:.1f} GiB"
    elif need > ram_fraction * free:
        run["baseline_skipped"] = f"2 x KV {need / GiB:.1f} GiB > {ram_fraction:.0%} of free memory {free / GiB:.1f} GiB"
    run["baseline"] = _baseline_run(model, context, steps) if run["baseline_skipped"] is None else None
    gc.collect()
    return run


def _isolated_context(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`_context_run` in a fresh process (spawned), so ``ru_maxrss`` is this context's alone."""
    device = torch.device(args["device"])
    model, weights = build_model(args["weights"], device=device, max_tokens=args["context"])
    run = _context_run(model, Config.load(args["config"]), args["context"], args["steps"], baseline=args["baseline"],
                       ram_fraction=args["ram_fraction"], baseline_max_bytes=args["baseline_max_bytes"], store_dir=args["store_dir"])
    run["weights"], run["model_dtype"], run["threads"] = weights, str(next(model.parameters()).dtype), torch.get_num_threads()
    return run


def _run_isolated(args: dict[str, Any]) -> dict[str, Any]:
    """:func:`_isolated_context` in a fresh interpreter (``python -m hkv.bench.decode``): the
    arguments go in as JSON on stdin, the figures come back as JSON in a temporary file."""
    import json
    import subprocess
    import sys

    import os

    env = dict(os.environ)  # the child imports this hkv, not whichever one is installed
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="hkv-bench-run-") as folder:
        result = Path(folder) / "result.json"
        done = subprocess.run([sys.executable, "-m", "hkv.bench.decode", str(result)], input=json.dumps(args), text=True, env=env)
        if done.returncode != 0:  # its stderr went to ours, above
            context, code = args["context"], done.returncode
            raise RuntimeError(f"bench decode: the process for {context} tokens failed (exit {code}; its output is above)")
        return json.loads(result.read_text())


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
    baseline_max_bytes: int | None = None,
    isolate: bool = False,
    store_dir: str | Path | None = None,
    prefetch: bool | None = None,
) -> dict[str, Any]:
    """Decode latency per token of hkv sparse mode and of ``DynamicCache`` at each context length.

    ``config``: hkv's config (its attention/tier settings; mode is forced to sparse, prefetch
    to ``prefetch`` (None: the config's, with "auto" resolved for ``device`` and this machine's
    cores, :meth:`~hkv.config.PrefetchConfig.on`), the disk store goes to a temporary folder, under ``store_dir`` if given, removed after
    each context, and the disk budget is raised to the KV + 2% + 1 GiB where it is smaller);
    None: defaults with :data:`BENCH_TIERS`. ``weights``: "smollm2" (the real model, so decode
    queries are realistic), "random" (SmolLM2's shape) or "auto" (smollm2 when installed).
    ``device``: default cuda if available, else cpu. The baseline is skipped (``None``, the
    reason in ``baseline_skipped``) where its KV (model dtype) exceeds ``baseline_max_bytes`` or
    twice it exceeds ``ram_fraction`` of free RAM (or of free GPU memory on cuda). ``model``:
    an already built model (from :func:`build_model`, on ``device``) to reuse across calls
    instead of building one; ``weights`` then only labels it. ``isolate``: each context runs in
    a fresh (spawned) process that builds its own model, so ``rss_lifetime_peak_bytes``
    (``ru_maxrss``) is that context's peak, model and imports included; without it that figure
    is the peak of the whole process so far, and ``rss_peak_bytes`` (sampled every 50 ms during
    hkv's fill and decode) is the one to read.
    Returns a dict with at least ``contexts``, ``hkv_ms``, ``baseline_ms``, ``hit_rate``,
    ``stall_frac``, ``rss_peak_bytes``, ``tier_bytes``.
    """
    if steps < 1:
        raise ValueError(f"steps = {steps} must be at least 1")
    if isolate and model is not None:
        raise ValueError("isolate=True builds the model in each context's process; do not pass model=")
    config = config if config is not None else Config.load(tiers=BENCH_TIERS)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prefetch_auto = prefetch is None and config.prefetch.enabled == "auto"
    if prefetch is None:
        prefetch = config.prefetch.on(gpu=device.type == "cuda")
    config = Config.load(config, env={}, prefetch={"enabled": prefetch})
    model_dtype = None
    if not isolate:
        if model is None:
            model, weights = build_model(weights, device=device, max_tokens=max(contexts))
        elif next(model.parameters()).device.type != device.type:
            raise ValueError(f"the model is on {next(model.parameters()).device}, the benchmark runs on {device}")
        model_dtype = next(model.parameters()).dtype
    t = config.tiers
    figures: dict[str, Any] = {
        "contexts": list(contexts),
        "hkv_ms": [],
        "baseline_ms": [],
        "hit_rate": [],
        "stall_frac": [],
        "host_ms_per_layer": [],
        "layer_ms": [],
        "precision": [],
        "missed_per_step": [],
        "hkv_fill_s": [],
        "baseline_fill_s": [],
        "baseline_skipped": [],
        "tiers": [],
        "tiers_after_fill": [],
        "tier_bytes": [],
        "kv_bytes": [],
        "disk_budget": [],
        "moved_bytes": [],
        "rss_peak_bytes": [],
        "rss_peak_anon_bytes": [],
        "rss_peak_file_bytes": [],
        "rss_start_bytes": [],
        "rss_teardown_peak_bytes": [],
        "rss_lifetime_peak_bytes": [],
        "rss_limit_bytes": int(t.device) + int(t.host) + 2 * GiB,
        "steps": steps,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "storage_dtype": t.dtype,
        "isolated": isolate,
        "fill": "synthetic KV appended per layer without a prefill (keys: per-head mean + noise; values: Gaussian)",
        "timed": "one decode forward per token (median of steps after 2 warm-up steps)",
        "hkv_config": {k: v for k, v in config.as_dict().items() if k in ("tiers", "attention", "prefetch")},
        # how prefetch.enabled was chosen: "auto" (on with a GPU or >= 4 cores) or as given
        "prefetch_chosen": f"auto ({'GPU' if device.type == 'cuda' else f'{cpu_cores()} cores, no GPU'})" if prefetch_auto else "given",
    }
    for context in contexts:
        if isolate:
            run = _run_isolated(dict(config=config.as_dict(), context=context, steps=steps, weights=weights, device=str(device),
                                     baseline=baseline, ram_fraction=ram_fraction, baseline_max_bytes=baseline_max_bytes,
                                     store_dir=None if store_dir is None else str(store_dir)))
            figures["threads"], used, model_dtype = run["threads"], run["weights"], run["model_dtype"]
        else:
            run = _context_run(model, config, context, steps, baseline=baseline, ram_fraction=ram_fraction,
                               baseline_max_bytes=baseline_max_bytes, store_dir=None if store_dir is None else Path(store_dir))
            used = weights
        figures["model"] = f"SmolLM2-135M shape ({used} weights), {model_dtype}"
        figures["hkv_ms"].append(run["ms"])
        figures["hit_rate"].append(run["hit_rate"])
        figures["stall_frac"].append(run["stall_frac"])
        figures.setdefault("table_read_frac", []).append(run["table_read_frac"])
        figures.setdefault("cuda_graphs", []).append(run["cuda_graphs"])
        figures["host_ms_per_layer"].append(run["host_ms_per_layer"])
        figures["layer_ms"].append(run["layer_ms"])
        figures["precision"].append(run["precision"])
        figures["missed_per_step"].append(run["missed_per_step"])
        figures["hkv_fill_s"].append(run["fill_s"])
        figures["tiers"].append(dict(run["tiers"]))
        figures["tiers_after_fill"].append(dict(run["tiers_after_fill"]))
        figures["tier_bytes"].append({name: usage["used_bytes"] for name, usage in run["tiers_after_fill"].items()})
        figures["kv_bytes"].append(run["kv_bytes"])
        figures["disk_budget"].append(run["disk_budget"])
        figures["moved_bytes"].append(run["moved_bytes"])
        rss = run["rss"]
        figures["rss_peak_bytes"].append(rss["peak"])
        figures["rss_peak_anon_bytes"].append(rss["peak_anon"])
        figures["rss_peak_file_bytes"].append(rss["peak_file"])
        figures["rss_start_bytes"].append(rss["start"])
        figures["rss_teardown_peak_bytes"].append(rss.get("with_teardown"))
        figures["rss_lifetime_peak_bytes"].append(rss["lifetime_peak"])
        base = run["baseline"]
        figures["baseline_ms"].append(None if base is None else base["ms"])
        figures["baseline_fill_s"].append(None if base is None else base["fill_s"])
        figures["baseline_skipped"].append(run["baseline_skipped"])
        gc.collect()
    hkv = figures["hkv_ms"]
    figures["hkv_growth"] = hkv[-1] / hkv[0] if len(hkv) > 1 else None
    base_last = figures["baseline_ms"][-1]
    figures["speedup_at_max"] = base_last / hkv[-1] if base_last else None
    peak_key = "rss_lifetime_peak_bytes" if isolate else "rss_peak_bytes"
    figures["rss_within_limit"] = [peak <= figures["rss_limit_bytes"] for peak in figures[peak_key]]
    return figures


def print_table(figures: dict[str, Any]) -> None:
    """The figures as a table on stdout."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"decode latency per token, {figures['model']} on {figures['device']} ({figures['threads']} threads)")
    print(f"KV: {figures['fill']}; timed: {figures['timed']}")
    tiers = figures.get("hkv_config", {}).get("tiers", {})
    if tiers:
        print(f"tiers: device {tiers['device'] / GiB:.2f} GiB, host {tiers['host'] / GiB:.2f} GiB, rest on disk; storage dtype {tiers['dtype']}")
    pf = figures.get("hkv_config", {}).get("prefetch", {})
    if pf:
        chosen = figures.get("prefetch_chosen", "given")
        print(f"prefetch: {'on, ' + str(pf['workers']) + ' workers' if pf['enabled'] else 'off'}" + ("" if chosen == "given" else f", chosen by prefetch.enabled = {chosen}"))
    print(f"{'context':>9} {'hkv ms':>9} {'Dynamic ms':>11} {'speedup':>8} {'host ms/layer':>14} {'hit rate':>9} {'miss/step':>10}"
          f" {'stall':>7} {'fill s':>8} {'peak RSS':>9} {'dev/host/disk GiB':>19}")
    for i, context in enumerate(figures["contexts"]):
        hkv, base = figures["hkv_ms"][i], figures["baseline_ms"][i]
        speed = base / hkv if base else None
        peaks = figures.get("rss_lifetime_peak_bytes" if figures.get("isolated") else "rss_peak_bytes")
        peak = peaks[i] / GiB if peaks else None
        per_tier = figures.get("tier_bytes", [None] * (i + 1))[i]
        tier_text = "/".join(f"{per_tier[name] / GiB:.2f}" for name in ("device", "host", "disk")) if per_tier else "-"
        print(
            f"{context:>9} {fmt(hkv, '9.2f')} {fmt(base, '11.2f')} {fmt(speed, '7.2f') + ('x' if speed else ''):>8} "
            f"{fmt(figures.get('host_ms_per_layer', [None] * (i + 1))[i], '14.3f')} {fmt(figures['hit_rate'][i], '9.1%')} {fmt(figures.get('missed_per_step', [None] * (i + 1))[i], '10.0f')} "
            f"{fmt(figures['stall_frac'][i], '7.1%')} {fmt(figures['hkv_fill_s'][i], '8.1f')} "
            f"{fmt(peak, '8.2f') + ('G' if peak is not None else ''):>9} {tier_text:>19}"
        )
    for i, reason in enumerate(figures.get("baseline_skipped", [])):
        if reason and reason != "not run":
            print(f"DynamicCache skipped at {figures['contexts'][i]}: {reason}")
    if figures.get("host_ms_per_layer"):
        print("host ms/layer: hkv's own time per layer and step outside the kernels that read the step's bytes (scoring "
              "matmuls, the gather's copy, attention) and outside stalls: selection's small ops, bookkeeping, lock, prefetch "
              "submissions, appending (StepStats.host_s)")
        for i, parts in enumerate(figures.get("layer_ms", [])):
            if parts:
                table = figures.get("table_read_frac", [None] * (i + 1))[i]
                graphs = figures.get("cuda_graphs", [None] * (i + 1))[i]
                print(f"  {figures['contexts'][i]}: per layer ms " + ", ".join(f"{name} {value:.3f}" for name, value in parts.items())
                      + (f"; {table:.0%} of layer reads through the device block tables" if table is not None else "")
                      + (f"; CUDA graphs: {graphs['captures']} captures, {graphs['replays']} replays"
                         + (f", off: {graphs['failure']}" if graphs["failure"] else "") if graphs else ""))  # fmt: skip
    if figures.get("hkv_growth") is not None:
        print(f"hkv latency at {figures['contexts'][-1]} / at {figures['contexts'][0]}: {figures['hkv_growth']:.2f}x")
    if figures.get("rss_limit_bytes"):
        which = "ru_maxrss of a fresh process per context" if figures.get("isolated") else "sampled during hkv's fill and decode"
        print(f"peak RSS ({which}) limit device + host + 2 GiB = {figures['rss_limit_bytes'] / GiB:.2f} GiB: "
              f"within at {[c for c, ok in zip(figures['contexts'], figures['rss_within_limit']) if ok]}")


if __name__ == "__main__":  # one context in a fresh process, for run_decode_bench(isolate=True)
    import json
    import sys

    Path(sys.argv[1]).write_text(json.dumps(_isolated_context(json.loads(sys.stdin.read())), default=str))


# Issue 15's disk-bound decode ("--preset disk"): the host tier far below the KV, so most blocks
# a step reads come from the disk store (its pages dropped from the page cache after the fill),
# against the same run with the host tier holding the whole KV. float16 blocks, as on a GPU.
DISK_PRESET: dict[str, Any] = {"contexts": (131072,), "tiers": {"device": "256MiB", "host": "256MiB", "dtype": "float16"}}


def run_disk_bound_bench(
    config: Config | None = None, *, contexts: tuple[int, ...] = DISK_PRESET["contexts"], steps: int = 16,
    weights: str = "auto", model: torch.nn.Module | None = None, store_dir: str | Path | None = None, prefetch: bool | None = True,
    warmup: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """hkv's decode step at each context, twice on the same model and synthetic KV: disk-bound
    (``config``'s tiers, default :data:`DISK_PRESET`'s: host 256 MiB; store pages dropped after
    the fill, its block records before every step, untimed) and host-resident (the same config with the host tier raised to the KV + 10%).
    ``warmup``: untimed steps first (the first ~13 steps after the fill move its newest blocks,
    which have no copy below, down the tiers).

    Returns ``contexts``, and per context ``disk_ms`` / ``host_ms`` (median step), ``ratio``
    (disk / host), ``disk_stall_frac``, ``disk_share`` (blocks read from disk in the timed steps
    / blocks read), ``disk_blocks_per_step``, ``disk_hit_rate``, ``host_hit_rate``, and ``runs``
    (both runs' full figures)."""
    config = config if config is not None else Config.load(tiers={**BENCH_TIERS, **DISK_PRESET["tiers"]})
    if prefetch is not None:  # None: the config's
        config = Config.load(config, env={}, prefetch={"enabled": prefetch})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        model, weights = build_model(weights, device=device, max_tokens=max(contexts))
    figures: dict[str, Any] = {"contexts": list(contexts), "steps": steps, "warmup": warmup, "model": f"SmolLM2-135M shape ({weights} weights)",
                               "device": str(device), "threads": torch.get_num_threads(), "host_budget": int(config.tiers.host),
                               "device_budget": int(config.tiers.device), "storage_dtype": config.tiers.dtype,
                               "disk_encoding": config.tiers.disk_encoding, "runs": []}  # fmt: skip
    for name in ("disk_ms", "host_ms", "ratio", "disk_stall_frac", "disk_share", "disk_blocks_per_step", "disk_hit_rate", "host_hit_rate"):
        figures[name] = []
    for context in contexts:
        kv = storage_kv_bytes(model.config, config, context, next(model.parameters()).dtype)
        resident = Config.load(config, env={}, tiers={"host": max(int(config.tiers.host), int(kv * 1.1))})
        runs = {}
        for label, run_config, drop in (("disk", config, True), ("host", resident, False)):
            store = Path(tempfile.mkdtemp(prefix="hkv-bench-", dir=store_dir))
            try:
                runs[label] = _hkv_run(model, run_config, context, steps, store, drop_pages=drop, warmup=warmup)
            finally:
                shutil.rmtree(store, ignore_errors=True)
            gc.collect()
        disk, host = runs["disk"], runs["host"]
        figures["disk_ms"].append(disk["ms"])
        figures["host_ms"].append(host["ms"])
        figures["ratio"].append(disk["ms"] / host["ms"])
        figures["disk_stall_frac"].append(disk["stall_frac"])
        figures["disk_share"].append(disk["disk_share"])
        figures["disk_blocks_per_step"].append(disk["disk_blocks_per_step"])
        figures["disk_hit_rate"].append(disk["hit_rate"])
        figures["host_hit_rate"].append(host["hit_rate"])
        figures["runs"].append({"disk": {k: v for k, v in disk.items() if k != "tiers"}, "host": {k: v for k, v in host.items() if k != "tiers"}})
    return figures


def print_disk_bound_table(figures: dict[str, Any]) -> None:
    """The disk-bound figures as a table: each context's step from disk against from host RAM."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"disk-bound decode, {figures['model']} on {figures['device']} ({figures['threads']} threads): host tier "
          f"{figures['host_budget'] / 2**20:.0f} MiB, device {figures['device_budget'] / 2**20:.0f} MiB, {figures['storage_dtype']} "
          f"blocks, disk encoding {figures.get('disk_encoding', 'none')}; store pages dropped after the fill, block records' before "
          "every step; against the same "
          "run with the host tier holding the KV")  # fmt: skip
    print(f"{'context':>9} {'disk ms':>9} {'host ms':>9} {'ratio':>6} {'target':>7} {'stall':>7} {'target':>7} "
          f"{'from disk':>10} {'target':>7} {'disk blocks/step':>17}")  # fmt: skip
    for i, context in enumerate(figures["contexts"]):
        ratio, stall, share = figures["ratio"][i], figures["disk_stall_frac"][i], figures["disk_share"][i]
        print(f"{context:>9,} {figures['disk_ms'][i]:>9.1f} {figures['host_ms'][i]:>9.1f} {ratio:>6.2f} {'<= 2':>7} "
              f"{fmt(stall, '.0%'):>7} {'< 25%':>7} {fmt(share, '.0%'):>10} {'>= 80%':>7} {figures['disk_blocks_per_step'][i]:>17.0f}")  # fmt: skip
