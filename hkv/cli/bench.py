"""``hkv bench``: the benchmarks, each printing a table and, with ``--json``, writing its figures.

A sub-app of the ``hkv`` command (:mod:`hkv.cli.app`); the benchmarks themselves live in
:mod:`hkv.bench` and are imported inside each command (they pull in transformers).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..blocks import BlockLayout
from ..config import Config, ConfigError
from .common import HELP_MARKUP, ConfigOption, JsonOption, choices, fail, human_bytes, load, parse_lengths, user_errors, write_json

bench_app = typer.Typer(
    help="Benchmarks that print a table and, with --json, write their figures.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP
)


def write_png(path: Path | None, figures: dict[str, Any]) -> None:
    """Draw ``figures`` to ``path`` (nothing when None); a missing matplotlib is one line, not a failure."""
    if path is None:
        return
    from ..bench.plots import plot

    try:
        typer.echo(f"wrote {plot(figures, path)}")
    except RuntimeError as error:  # matplotlib missing: the figures are in the table and the JSON
        typer.echo(f"no PNG: {error}", err=True)


@bench_app.command("tiers")
def bench_tiers(
    json_path: JsonOption = None,
    config: ConfigOption = None,
    size: Annotated[str, typer.Option(help="bytes moved per measurement, e.g. 256MiB")] = "256MiB",
    disk_size: Annotated[str, typer.Option(help="bytes written to and read from the disk tier, e.g. 1GiB")] = "1GiB",
) -> None:
    """Block moves host<->device and disk-tier reads/writes against plain copies and raw file I/O."""
    from pydantic import ByteSize, TypeAdapter

    from ..bench.tiers import print_table, run_tiers_bench

    cfg = load(config)
    parse = TypeAdapter(ByteSize).validate_python
    figures = run_tiers_bench(cfg, move_bytes=int(parse(size)), disk_bytes=int(parse(disk_size)))
    print_table(figures)
    write_json(json_path, figures)


def _bench_disk_bound(cfg: Config | None, lengths: tuple[int, ...] | None, steps: int, device_budget: str | None,
                      host_budget: str | None, weights: str, store_dir: Path | None, prefetch: bool | None, json_path: Path | None,
                      disk_encoding: str | None = None, warmup: int = 2) -> None:  # fmt: skip
    """``hkv bench decode --preset disk``: :func:`hkv.bench.decode.run_disk_bound_bench`."""
    from ..bench.decode import BENCH_TIERS, DISK_PRESET, print_disk_bound_table, run_disk_bound_bench

    tiers = {**DISK_PRESET["tiers"], **({"device": device_budget} if device_budget else {}), **({"host": host_budget} if host_budget else {}),
             **({"disk_encoding": disk_encoding} if disk_encoding else {})}
    try:
        run_config = Config.load(cfg if cfg is not None else Config.load(tiers=BENCH_TIERS), env={}, tiers=tiers)
    except ConfigError as error:
        raise fail(str(error), 2) from None
    if prefetch is None and run_config.prefetch.enabled == "auto":
        prefetch = True  # the preset measures how much of the disk reads the prefetcher hides, on any core count
    figures = run_disk_bound_bench(run_config, contexts=lengths or DISK_PRESET["contexts"], steps=steps, weights=weights,
                                   store_dir=store_dir, prefetch=prefetch, warmup=warmup)  # fmt: skip
    print_disk_bound_table(figures)
    write_json(json_path, figures)


@bench_app.command("decode")
def bench_decode(
    json_path: JsonOption = None,
    config: ConfigOption = None,
    contexts: Annotated[
        Optional[str], typer.Option(help="comma-separated context lengths in tokens (default 8192,32768,131072; with --preset million 8192,524288,1048576)")
    ] = None,
    steps: Annotated[int, typer.Option(help="decode steps timed per context (median reported)")] = 16,
    warmup: Annotated[int, typer.Option(min=0, help="--preset disk: untimed steps before them (more: past the first steps after the fill, "
                                                    "which move the fill's newest blocks down the tiers)")] = 2,
    preset: Annotated[
        Optional[str], typer.Option(help="million: 8K/512K/1M tokens, device 1GiB, host 4GiB, rest on disk, float16 blocks, a fresh process per context; "
                                          "disk: 128K tokens with the host tier at 256MiB (store pages dropped) against the same run with the KV in host RAM")
    ] = None,
    device_budget: Annotated[Optional[str], typer.Option(help="tiers.device for the run, e.g. 1GiB")] = None,
    host_budget: Annotated[Optional[str], typer.Option(help="tiers.host for the run, e.g. 4GiB")] = None,
    disk_budget: Annotated[Optional[str], typer.Option(help="tiers.disk (raised to the KV + 2% + 1GiB where smaller)")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="tiers.dtype, the blocks' storage dtype: float16, bfloat16, float32, auto")] = None,
    weights: Annotated[str, typer.Option(help="auto (SmolLM2 if installed), smollm2 or random")] = "auto",
    store_dir: Annotated[Optional[Path], typer.Option(help="folder for the temporary disk store (default: the system temp folder)")] = None,
    isolate: Annotated[Optional[bool], typer.Option("--isolate/--no-isolate", help="each context in a fresh process (its own peak RSS)")] = None,
    baseline_max: Annotated[Optional[str], typer.Option(help="skip DynamicCache where its KV exceeds this, e.g. 8GiB")] = None,
    png: Annotated[Optional[Path], typer.Option(help="latency and memory against context length (needs matplotlib)")] = None,
    prefetch: Annotated[Optional[bool], typer.Option("--prefetch/--no-prefetch", help="hkv's prefetcher on or off (default: --config's prefetch.enabled; \"auto\", the default, is on with a GPU or 4+ cores)")] = None,
    predict: Annotated[bool, typer.Option("--predict", help="also measure this machine as hkv tune does and print the cost model's step beside each measured one")] = False,
    disk_encoding: Annotated[Optional[str], typer.Option(help="tiers.disk_encoding for the run: none, int8 or int4 (sparse only)")] = None,
) -> None:
    """Decode latency per token, hkv sparse vs transformers' DynamicCache, same model shape."""
    from pydantic import ByteSize, TypeAdapter

    from ..bench.decode import bench_options, print_table, run_decode_bench

    # Without --config the benchmark sizes the host tier itself so that 128K tokens fit in RAM.
    cfg = load(config) if config is not None else None
    lengths = parse_lengths(contexts, "--contexts") if contexts else None
    if preset == "disk":
        _bench_disk_bound(cfg, lengths, steps, device_budget, host_budget, weights, store_dir, prefetch, json_path, disk_encoding, warmup)
        return
    try:
        limit = int(TypeAdapter(ByteSize).validate_python(baseline_max)) if baseline_max is not None else None
        options = bench_options(cfg, preset=preset, contexts=lengths, device_budget=device_budget, host_budget=host_budget,
                                disk_budget=disk_budget, dtype=dtype, baseline_max_bytes=limit, isolate=isolate,
                                disk_encoding=disk_encoding)  # fmt: skip
    except (ConfigError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    model = None
    if predict:
        if options["isolate"]:
            raise fail("--predict measures in this process: add --no-isolate", 2)
        import torch

        from ..bench.smollm2 import build_model

        model, weights = build_model(weights, device="cuda" if torch.cuda.is_available() else "cpu", max_tokens=max(options["contexts"]))
    figures = run_decode_bench(**options, steps=steps, weights=weights, store_dir=store_dir, prefetch=prefetch, model=model)
    print_table(figures)
    if model is not None:
        from ..tune.compute import hkv_step_ms
        from ..tune.machine import measure_machine
        from ..tune.plan import ModelShape, predict_step

        run_config = Config.load(figures["hkv_config"], env={})
        shape = ModelShape.of(model)
        layout = BlockLayout(shape.kv_heads, run_config.attention.block_tokens, shape.head_dim, shape.dtype)
        machine = measure_machine(store_dir or Path(tempfile.gettempdir()), layout, sample_bytes=64 << 20)
        compute_ms = hkv_step_ms(model, run_config, 2 * run_config.attention.budget_tokens)  # as hkv tune times it
        figures["machine"], figures["predicted"] = machine.as_dict(), []
        for context, measured in zip(figures["contexts"], figures["hkv_ms"]):
            step = predict_step(run_config, shape, context, machine, compute_ms)
            figures["predicted"].append(asdict(step))
            typer.echo(f"{context:>8} tokens: predicted {step.total_ms:8.1f} ms (bound by {step.bound}), measured {measured:8.1f} ms")
    write_json(json_path, figures)
    write_png(png, figures)


def parse_depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        depths = ()
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        typer.echo(f"error: --depths {text!r}: expected comma-separated fractions between 0 and 1, e.g. 0.1,0.5,0.9", err=True)
        raise typer.Exit(2)
    return depths


def _modes(text: str, check: Any) -> tuple[str, ...]:
    """``--modes`` of the passkey and ruler benchmarks: names ``check`` accepts; exit 2 otherwise."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        for name in names or ("",):
            check(name)
    except ValueError as error:
        raise fail(f"--modes {text!r}: {error}", 2) from None
    return names


@bench_app.command("passkey")
def bench_passkey(
    json_path: JsonOption = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config whose tier budgets and prefetch settings the hkv runs use")] = None,
    lengths: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens")] = "4096,8192,32768,131072",
    depths: Annotated[str, typer.Option(help="comma-separated depths of the key in the filler, 0 to 1")] = "0.1,0.3,0.5,0.7,0.9",
    trials: Annotated[int, typer.Option(min=1, help="prompts (keys) per length and depth")] = 1,
    modes: Annotated[str, typer.Option(help="comma-separated: exact, original, remap, full; a sparse one may add a lossy disk encoding: remap+int8, remap+int4")] = "exact,original,remap,full",
    variants: Annotated[str, typer.Option(help="single (one call), late (question in a later turn, after the context was stored)")] = "single",
    full_max: Annotated[int, typer.Option(help="longest prompt run with full attention (DynamicCache)")] = 8192,
    exact_max: Annotated[int, typer.Option(help="longest prompt run with hkv exact")] = 8192,
    budget: Annotated[int, typer.Option(help="attention.budget_tokens of the sparse modes")] = 2048,
    store_dir: Annotated[Optional[Path], typer.Option(help="folder for the temporary stores (default: the system temp folder)")] = None,
    png: Annotated[Optional[Path], typer.Option(help="accuracy against length (needs matplotlib; default: beside --json)")] = None,
    device: Annotated[str, typer.Option(help="torch device of the model and hkv's device tier: cpu, cuda, cuda:N")] = "cpu",
) -> None:
    """Passkey accuracy of SmolLM2 over depths x lengths: hkv exact / sparse original / sparse remap / full attention."""
    from ..bench.passkey import VARIANTS, check_mode, run_passkey_bench, table_lines

    names = _modes(modes, check_mode)
    options = dict(lengths=parse_lengths(lengths, "--lengths"), depths=parse_depths(depths), trials=trials,
                   modes=names, variants=choices(variants, "--variants", VARIANTS),
                   full_max=full_max, exact_max=exact_max, budget=budget, device=device)  # fmt: skip
    base = load(config) if config is not None else None
    if store_dir is not None and store_dir.exists() and not store_dir.is_dir():
        raise fail(f"--store-dir {store_dir} is a file, not a folder", 2)

    def save(figures: dict[str, Any]) -> None:  # --json holds the runs so far while a long sweep goes on
        write_json(json_path, figures, quiet=True)

    with user_errors():
        figures = run_passkey_bench(**options, base_config=base, store_dir=store_dir, log=typer.echo,
                                    on_run=save)  # fmt: skip
    for line in table_lines(figures):
        typer.echo(line)
    write_json(json_path, figures)
    write_png(png if png is not None else (json_path.with_suffix(".png") if json_path is not None else None), figures)


@bench_app.command("plot")
def bench_plot(
    source: Annotated[Path, typer.Argument(help="JSON written by hkv bench passkey or decode --json, or benchmarks/peers/run.py --json")],
    out: Annotated[Path, typer.Argument(help="PNG file to write")],
) -> None:
    """Redraw a benchmark's picture from its saved JSON (needs matplotlib)."""
    from ..bench.plots import plot

    try:
        figures = json.loads(source.read_text())
        written = plot(figures, out)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise fail(f"{source}: {error}", 2) from None
    typer.echo(f"wrote {written}")


@bench_app.command("resume")
def bench_resume(
    json_path: JsonOption = None,
    config: ConfigOption = None,
    tokens: Annotated[str, typer.Option(help="comma-separated conversation lengths in tokens")] = "2048,8192,32768",
    weights: Annotated[str, typer.Option(help="auto, smollm2 (real weights) or random (SmolLM2's shape)")] = "auto",
    fill: Annotated[str, typer.Option(help="how the saved conversation is built: real (prefill), synthetic (KV of the right shape), auto (real up to 2048 tokens)")] = "auto",
    reprefill_max: Annotated[int, typer.Option(help="skip the re-prefill baseline above this many tokens (0: never skip)")] = 0,
) -> None:
    """Time to first token resuming a saved conversation in a fresh process vs re-prefilling it."""
    from ..bench.resume import print_table, run_resume_bench

    cfg = load(config) if config is not None else None
    lengths = parse_lengths(tokens, "--tokens")
    figures = run_resume_bench(cfg, tokens=lengths, weights=weights, fill=fill, reprefill_max=reprefill_max or None)
    print_table(figures)
    write_json(json_path, figures)


@bench_app.command("remote")
def bench_remote(
    url: Annotated[str, typer.Option(help="redis:// URL of the server (a scratch one: hkv writes and deletes keys under hkv-bench:)")],
    blocks: Annotated[int, typer.Option(min=1, help="SmolLM2-shaped fp16 block records written and read")] = 2048,
    repeats: Annotated[int, typer.Option(min=1, help="interleaved runs of each read; the best is kept")] = 3,
    resume_tokens: Annotated[int, typer.Option(help="also time resuming a conversation of this many tokens from the remote tier vs the local store (0: skip)")] = 0,
    weights: Annotated[str, typer.Option(help="the resume's model: random (SmolLM2's shape) or smollm2")] = "random",
    json_path: JsonOption = None,
) -> None:
    """Block reads from the remote tier (MGET, every record checked) against a raw pipelined GET
    loop of the same bytes; with --resume-tokens, a conversation resumed on a second "machine"
    through the remote tier against a cold local resume."""
    from ..bench.remote import measure_remote
    from ..bench.resume import run_remote_resume

    with user_errors():
        try:
            figures = measure_remote(url, blocks=blocks, repeats=repeats)
            resume = run_remote_resume(url, resume_tokens, weights=weights) if resume_tokens else None
        except RuntimeError as error:
            raise fail(str(error)) from None
    typer.echo(f"{figures.blocks} blocks, {human_bytes(figures.record_bytes)} on {url}")
    typer.echo(f"remote tier reads  {figures.tier_read_gbps:7.3f} GB/s")
    typer.echo(f"raw pipelined GETs {figures.raw_get_gbps:7.3f} GB/s")
    typer.echo(f"ratio              {figures.ratio:7.3f}")
    result = {"reads": figures.as_dict()}
    if resume is not None:
        typer.echo(f"resume {resume.tokens} tokens, first token: local cold {resume.local_cold_s:.3f} s; through the remote tier, "
                   f"whole pull {resume.remote_s:.3f} s (ratio {resume.ratio:.2f}), lazy pull {resume.lazy_s:.3f} s (ratio "
                   f"{resume.lazy_ratio:.2f}, {resume.lazy_fetched} of {resume.lazy_blocks} blocks fetched by then); "
                   f"same first token: {resume.same_token}; load {resume.load}")  # fmt: skip
        result["resume"] = asdict(resume)
    write_json(json_path, result)


@bench_app.command("ruler")
def bench_ruler(
    length: Annotated[int, typer.Option(min=64, help="prompt length in tokens")] = 4096,
    tasks: Annotated[str, typer.Option(help="comma-separated: multikey, multivalue, vartrack, wordcount")] = "multikey,multivalue,vartrack,wordcount",
    trials: Annotated[int, typer.Option(min=1, help="prompts per task")] = 2,
    modes: Annotated[str, typer.Option(help="comma-separated: full, exact, original, remap; a sparse one may add +int8 / +int4")] = "full,remap,remap+int8,remap+int4",
    variant: Annotated[str, typer.Option(help="late (the question after the document was stored and reopened) or single")] = "late",
    budget: Annotated[int, typer.Option(help="attention.budget_tokens of the sparse modes")] = 2048,
    config: ConfigOption = None,
    json_path: JsonOption = None,
) -> None:
    """RULER-style tasks (several keys with distractors, several values, variable tracking, word counts) with full attention and every hkv mode and encoding asked for, same prompts."""
    from ..bench.passkey import check_mode
    from ..bench.ruler import run_ruler_bench, table_lines
    from ..ruler import TASKS

    names = _modes(modes, check_mode)
    base = load(config) if config is not None else None
    with user_errors():
        figures = run_ruler_bench(length=length, tasks=choices(tasks, "--tasks", TASKS), trials=trials, modes=names,
                                  variant=variant, budget=budget, base_config=base, log=typer.echo)  # fmt: skip
    for line in table_lines(figures):
        typer.echo(line)
    write_json(json_path, figures)
