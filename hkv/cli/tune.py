"""``hkv tune``: measure this machine, write a config for a model and a context length, and print
the decode step its cost model predicts (hkv/tune, docs/tuning.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config import ConfigError
from .common import JsonOption, fail, human_bytes, user_errors, write_json

_SUFFIX = {"": 1, "k": 1024, "m": 1024**2}


def parse_tokens(text: str) -> int:
    """``"131072"``, ``"128K"``, ``"1M"`` -> tokens (K = 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match or int(match.group(1)) < 1:
        raise typer.BadParameter(f"{text!r}: a positive token count such as 131072, 128K or 1M")
    return int(match.group(1)) * _SUFFIX[match.group(2).lower()]


def tune(
    context: Annotated[str, typer.Option("--context", help="target context length in tokens (131072, 128K, 1M)")],
    model: Annotated[str, typer.Option(help="'default' (SmolLM2-135M), or a folder of a Hugging Face model")] = "default",
    shape: Annotated[Optional[str], typer.Option(help="a bare shape instead of a model: layers=30,q_heads=9,kv_heads=3,head_dim=64,dtype=float16")] = None,
    mode: Annotated[str, typer.Option(help="attention mode: sparse or exact")] = "sparse",
    store: Annotated[Path, typer.Option(help="store folder the config names (its disk is measured)")] = Path("hkv-store"),
    out: Annotated[Path, typer.Option(help="TOML config to write")] = Path("hkv-tuned.toml"),
    sample: Annotated[str, typer.Option(help="bytes moved per measurement (more: steadier, slower)")] = "128MiB",
    json_path: JsonOption = None,
) -> None:
    """Measure this machine (free memory and disk, the rates hkv moves blocks at, cores, GPU), plan
    tier budgets, disk encoding and prefetch for a model and a context length, write them as a
    TOML config, and print the decode step the cost model predicts and what bounds it.

    `hkv bench decode --config FILE` of the written config measures the step beside the prediction.
    """
    from pydantic import ByteSize, TypeAdapter

    from ..config import Config
    from ..tune.compute import attention_step_ms, hkv_step_ms, model_step_ms
    from ..tune.machine import measure_machine
    from ..tune.plan import ModelShape, plan, storage_dtype

    tokens = parse_tokens(context)
    if mode not in ("sparse", "exact"):
        raise fail(f"--mode {mode!r}: sparse or exact", 2)
    try:
        sample_bytes = int(TypeAdapter(ByteSize).validate_python(sample))
    except ValueError:
        raise fail(f"--sample {sample!r}: a byte size such as 64MiB", 2) from None
    loaded: Any = None
    if shape is not None:
        try:
            model_shape = ModelShape.parse(shape)
        except ValueError as error:
            raise fail(f"--shape: {error}", 2) from None
    else:
        loaded = _load_model(model)
        model_shape = ModelShape.of(loaded)
    base = Config.load(env={}, attention={"mode": mode})
    budget = base.attention.budget_tokens if mode == "sparse" else tokens
    typer.echo(f"measuring this machine ({human_bytes(sample_bytes)} per figure) ...")
    with user_errors():
        from ..blocks import BlockLayout

        layout = BlockLayout(model_shape.kv_heads, base.attention.block_tokens, model_shape.head_dim, model_shape.dtype)
        machine = measure_machine(store, layout, sample_bytes=sample_bytes)
        _cache_rates(machine, store, layout, sample_bytes)
    import torch

    device = torch.device("cuda" if machine.gpu else "cpu")
    if loaded is not None and mode == "sparse":
        timed_tokens = min(2 * budget, tokens)
        compute_ms = hkv_step_ms(loaded.to(device), Config.load(base, env={}, tiers={"dtype": storage_dtype(model_shape, mode)}), timed_tokens)
        compute_what = f"hkv's step over {timed_tokens} tokens, every block on the device"
    elif loaded is not None:
        compute_ms = model_step_ms(loaded.to(device), min(budget, tokens))
        compute_what = f"the model's step over {min(budget, tokens)} tokens (DynamicCache)"
    else:
        compute_ms = attention_step_ms(model_shape, min(budget, tokens), device)
        compute_what = f"attention alone over {min(budget, tokens)} tokens (a bare shape has no weights to time)"
    try:
        result = plan(model_shape, tokens, machine, store=store, mode=mode, compute_ms=compute_ms, base=base)
    except ConfigError as error:
        raise fail(str(error)) from None
    out.write_text(f"# written by `hkv tune --context {context}` for {model_shape}\n" + result.config.to_toml())
    for line in report_lines(result, machine, compute_what):
        typer.echo(line)
    typer.echo(f"wrote {out}")
    write_json(json_path, {"machine": machine.as_dict(), "plan": result.as_dict(), "compute": compute_what})


def _cache_rates(machine: Any, store: Path, layout: Any, sample_bytes: int) -> None:
    """Keep the measured rates for later starts without a config (``hkv demo``: hkv/tune/auto.py)."""
    import time

    from ..tune.auto import rates_of
    from ..tune.rates_cache import cache_key, write_rates

    key = cache_key("cuda" if machine.gpu else "cpu", store, layout.nbytes)
    write_rates(key, rates_of(machine, sample_bytes, "hkv tune", time.time()))


def _load_model(name: str) -> Any:
    import torch

    if name == "default":
        from ..default_model import ModelNotInstalledError, load_default_model

        try:
            return load_default_model(dtype=torch.float32)[0]
        except ModelNotInstalledError as error:
            raise fail(str(error)) from None
    path = Path(name)
    if not path.is_dir():
        raise fail(f"--model {name!r}: 'default' or a folder of a Hugging Face model", 2)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path).eval()
    except (OSError, ValueError) as error:
        raise fail(f"--model {name!r}: {error}") from None


def report_lines(result: Any, machine: Any, compute_what: str) -> list[str]:
    """What `hkv tune` prints: the machine, each tier's budget and share of the context, the
    prediction and its bound."""
    tiers, step = result.config.tiers, result.prediction
    gpu = machine.gpu or "none (the device tier is CPU RAM)"
    lines = [
        f"machine: {machine.cores} cores, GPU {gpu}",
        f"  free: device {human_bytes(machine.device_free_bytes)}, host {human_bytes(machine.host_free_bytes)}, "
        f"disk {human_bytes(machine.disk_free_bytes)}",
        f"  rates (GB/s): device {machine.device_gbps}, host->device {machine.host_to_device_gbps}, "
        f"disk reads {machine.disk_read_gbps} ({'cold' if machine.disk_cold else 'page cache warm'})",
        f"context: {result.context} tokens: KV {human_bytes(result.kv_bytes)} ({result.storage_dtype}), summaries {human_bytes(result.summary_bytes)}",
        f"  tiers.device = {human_bytes(int(tiers.device))} holds {human_bytes(result.tier_bytes['device'])}",
        f"  tiers.host   = {human_bytes(int(tiers.host))} holds {human_bytes(result.tier_bytes['host'])}",
        f"  tiers.disk   = {human_bytes(int(tiers.disk))} holds {human_bytes(result.tier_bytes['disk'])} (every block, {tiers.disk_encoding})",
        f"  prefetch: {'on, ' + str(result.config.prefetch.workers) + ' workers' if result.config.prefetch.enabled else 'off'}",
        f"predicted step: {step.total_ms} ms, bound by {step.bound}",
        f"  compute {step.compute_ms} ms ({compute_what}), summaries {step.summaries_ms} ms, "
        f"host moves {step.host_ms} ms, disk reads {step.disk_ms} ms",
        f"  blocks per step: {', '.join(f'{name} {count}' for name, count in step.blocks.items())}",
    ]
    return lines + [f"note: {note}" for note in result.notes]
