"""The ``hkv`` command: config checks, persistent chats and their sessions, benchmarks.

Heavy imports (the benchmarks, transformers, the store) happen inside the commands, so
``hkv config`` answers at once.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .config import Config, ConfigError

app = typer.Typer(help="hkv: tiered, attention-guided KV cache for long contexts.", no_args_is_help=True)
config_app = typer.Typer(help="Check and show configuration files.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print a table and, with --json, write their figures.", no_args_is_help=True)
app.add_typer(config_app, name="config")
sessions_app = typer.Typer(help="List, inspect, verify and delete the persistent sessions of a store.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(sessions_app, name="sessions")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file")]
StoreOption = Annotated[Optional[Path], typer.Option("--store", help="store folder (default: tiers.path of --config)")]
JsonOption = Annotated[Optional[Path], typer.Option("--json", help="write the figures to this JSON file")]


def _load(path: Path | None) -> Config:
    try:
        return Config.load(path)
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="TOML config file")]) -> None:
    """Validate FILE (and HKV_* environment overrides); exit 2 with the problems if invalid."""
    _load(file)
    typer.echo(f"{file}: ok")


@config_app.command("show")
def config_show(file: Annotated[Optional[Path], typer.Argument(help="TOML config file; defaults if omitted")] = None) -> None:
    """Print the effective config (defaults, FILE, then HKV_* environment) as TOML."""
    typer.echo(_load(file).to_toml(), nl=False)


def _lengths(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated token counts; exit 2 with one line if one is not a positive integer."""
    try:
        lengths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        typer.echo(f"error: {option} {text!r}: expected comma-separated positive token counts, e.g. 2048,8192", err=True)
        raise typer.Exit(2)
    return lengths


def _write_json(path: Path | None, figures: dict[str, Any], *, quiet: bool = False) -> None:
    """Write ``figures`` to ``path`` (nothing when None) whole or not at all: a run killed while
    writing leaves the previous file (long sweeps rewrite theirs after every run)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    partial.replace(path)
    if not quiet:
        typer.echo(f"wrote {path}")


def _write_png(path: Path | None, figures: dict[str, Any]) -> None:
    """Draw ``figures`` to ``path`` (nothing when None); a missing matplotlib is one line, not a failure."""
    if path is None:
        return
    from .bench.plots import plot

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

    from .bench.tiers import print_table, run_tiers_bench

    cfg = _load(config)
    parse = TypeAdapter(ByteSize).validate_python
    figures = run_tiers_bench(cfg, move_bytes=int(parse(size)), disk_bytes=int(parse(disk_size)))
    print_table(figures)
    _write_json(json_path, figures)


@bench_app.command("decode")
def bench_decode(
    json_path: JsonOption = None,
    config: ConfigOption = None,
    contexts: Annotated[
        Optional[str], typer.Option(help="comma-separated context lengths in tokens (default 8192,32768,131072; with --preset million 8192,524288,1048576)")
    ] = None,
    steps: Annotated[int, typer.Option(help="decode steps timed per context (median reported)")] = 16,
    preset: Annotated[
        Optional[str], typer.Option(help="million: 8K/512K/1M tokens, device 1GiB, host 4GiB, rest on disk, float16 blocks, a fresh process per context")
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
) -> None:
    """Decode latency per token, hkv sparse vs transformers' DynamicCache, same model shape."""
    from pydantic import ByteSize, TypeAdapter

    from .bench.decode import bench_options, print_table, run_decode_bench

    # Without --config the benchmark sizes the host tier itself so that 128K tokens fit in RAM.
    cfg = _load(config) if config is not None else None
    lengths = _lengths(contexts, "--contexts") if contexts else None
    try:
        limit = int(TypeAdapter(ByteSize).validate_python(baseline_max)) if baseline_max is not None else None
        options = bench_options(cfg, preset=preset, contexts=lengths, device_budget=device_budget, host_budget=host_budget,
                                disk_budget=disk_budget, dtype=dtype, baseline_max_bytes=limit, isolate=isolate)
    except (ConfigError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    figures = run_decode_bench(**options, steps=steps, weights=weights, store_dir=store_dir)
    print_table(figures)
    _write_json(json_path, figures)
    _write_png(png, figures)


@bench_app.command("peers")
def bench_peers(
    json_path: JsonOption = None,
    tokens: Annotated[int, typer.Option(help="passkey prompt length in tokens")] = 4096,
    trials: Annotated[int, typer.Option(help="prompts per task and method (depths cycle 0.1/0.5/0.9)")] = 3,
    venv: Annotated[Path, typer.Option(help="kvpress's own virtualenv, created on first use")] = Path(".venv-peers"),
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="also run kvpress (in --venv)")] = True,
    parallel: Annotated[bool, typer.Option(help="run kvpress while the local methods run (faster; shared CPU)")] = False,
    png: Annotated[Optional[Path], typer.Option(help="accuracy bar chart (needs matplotlib; default: beside --json)")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="start no new prompt after this long (partial figures kept)")] = None,
    tasks: Annotated[str, typer.Option(help="comma-separated: late (question in a later turn), single")] = "late,single",
    methods: Annotated[Optional[str], typer.Option(help="comma-separated local methods (default: all of hkv sparse, hkv exact, DynamicCache, QuantizedCache fp8, SlidingWindow)")] = None,
) -> None:
    """hkv vs DynamicCache, its fp8/sliding caches and kvpress presses at 25% of the KV, same prompts."""
    from .bench.peers import LOCAL_METHODS, TASKS, print_table, run_peers_bench

    chosen_tasks = _choices(tasks, "--tasks", TASKS)
    chosen_methods = _choices(methods, "--methods", LOCAL_METHODS) if methods is not None else LOCAL_METHODS

    def save_partial(rows: list, records: list) -> None:  # --json holds the figures so far while it runs
        _write_json(json_path, {"partial": True, "rows": rows, "records": records}, quiet=True)

    figures = run_peers_bench(tokens=tokens, trials=trials, venv=venv, peers=peers, parallel=parallel, tasks=chosen_tasks,
                              methods=chosen_methods, max_minutes=max_minutes, on_prompt=save_partial)  # fmt: skip
    print_table(figures)
    _write_json(json_path, figures)
    _write_png(png if png is not None else (json_path.with_suffix(".png") if json_path is not None else None), figures)


def _choices(text: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated names among ``allowed``; exit 2 with one line otherwise."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        typer.echo(f"error: {option} {text!r}: expected comma-separated names among {', '.join(allowed)}", err=True)
        raise typer.Exit(2)
    return names


def _depths(text: str) -> tuple[float, ...]:
    try:
        depths = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        depths = ()
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        typer.echo(f"error: --depths {text!r}: expected comma-separated fractions between 0 and 1, e.g. 0.1,0.5,0.9", err=True)
        raise typer.Exit(2)
    return depths


@bench_app.command("passkey")
def bench_passkey(
    json_path: JsonOption = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config whose tier budgets and prefetch settings the hkv runs use")] = None,
    lengths: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens")] = "4096,8192,32768,131072",
    depths: Annotated[str, typer.Option(help="comma-separated depths of the key in the filler, 0 to 1")] = "0.1,0.3,0.5,0.7,0.9",
    trials: Annotated[int, typer.Option(min=1, help="prompts (keys) per length and depth")] = 1,
    modes: Annotated[str, typer.Option(help="comma-separated: exact, original, remap, full")] = "exact,original,remap,full",
    variants: Annotated[str, typer.Option(help="single (one call), late (question in a later turn, after the context was stored)")] = "single",
    full_max: Annotated[int, typer.Option(help="longest prompt run with full attention (DynamicCache)")] = 8192,
    exact_max: Annotated[int, typer.Option(help="longest prompt run with hkv exact")] = 8192,
    budget: Annotated[int, typer.Option(help="attention.budget_tokens of the sparse modes")] = 2048,
    store_dir: Annotated[Optional[Path], typer.Option(help="folder for the temporary stores (default: the system temp folder)")] = None,
    png: Annotated[Optional[Path], typer.Option(help="accuracy against length (needs matplotlib; default: beside --json)")] = None,
    device: Annotated[str, typer.Option(help="torch device of the model and hkv's device tier: cpu, cuda, cuda:N")] = "cpu",
) -> None:
    """Passkey accuracy of SmolLM2 over depths x lengths: hkv exact / sparse original / sparse remap / full attention."""
    from .bench.passkey import MODES, VARIANTS, run_passkey_bench, table_lines

    options = dict(lengths=_lengths(lengths, "--lengths"), depths=_depths(depths), trials=trials,
                   modes=_choices(modes, "--modes", MODES), variants=_choices(variants, "--variants", VARIANTS),
                   full_max=full_max, exact_max=exact_max, budget=budget, device=device)  # fmt: skip
    base = _load(config) if config is not None else None
    if store_dir is not None and store_dir.exists() and not store_dir.is_dir():
        raise _fail(f"--store-dir {store_dir} is a file, not a folder", 2)

    def save(figures: dict[str, Any]) -> None:  # --json holds the runs so far while a long sweep goes on
        _write_json(json_path, figures, quiet=True)

    with _user_errors():
        figures = run_passkey_bench(**options, base_config=base, store_dir=store_dir, log=typer.echo,
                                    on_run=save)  # fmt: skip
    for line in table_lines(figures):
        typer.echo(line)
    _write_json(json_path, figures)
    _write_png(png if png is not None else (json_path.with_suffix(".png") if json_path is not None else None), figures)


@bench_app.command("plot")
def bench_plot(
    source: Annotated[Path, typer.Argument(help="JSON written by hkv bench passkey, decode or peers --json")],
    out: Annotated[Path, typer.Argument(help="PNG file to write")],
) -> None:
    """Redraw a benchmark's picture from its saved JSON (needs matplotlib)."""
    from .bench.plots import plot

    try:
        figures = json.loads(source.read_text())
        written = plot(figures, out)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise _fail(f"{source}: {error}", 2) from None
    typer.echo(f"wrote {written}")


# -- chat and sessions -------------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned Exit."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the store's and sessions' errors into one line on stderr and exit 1 (no traceback)."""
    from .tiers.base import TierError

    try:
        yield
    except (TierError, FileNotFoundError, PermissionError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise _fail(str(message)) from None


def _store_path(store: Path | None, config: Path | None) -> Path:
    return store if store is not None else Path(_load(config).tiers.path)


@contextlib.contextmanager
def _open_store(path: Path, *, readonly: bool = True) -> Iterator[Any]:
    """The :class:`~hkv.tiers.session_store.SessionStore` at ``path``, opened without a model."""
    from .tiers.session_store import SessionStore

    if not path.is_dir():
        raise _fail(f"no hkv store at {str(path)!r} (set --store or tiers.path in --config)")
    with _user_errors():
        store = SessionStore.open(path, readonly=readonly)
        try:
            yield store
        finally:
            store.close()


def _size(nbytes: int) -> str:
    from .demo import human_bytes  # the sessions commands import torch through the store anyway

    return human_bytes(nbytes)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


@app.command("chat")
def chat(
    session: Annotated[str, typer.Option("--session", "-s", help="session name: the conversation persists under it")],
    config: ConfigOption = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    system: Annotated[Optional[str], typer.Option(help="system prompt (first turn of a new session only)")] = None,
) -> None:
    """Chat with the default model (SmolLM2-135M-Instruct); the conversation persists in the store.

    Reads one user turn per line from stdin (an interactive prompt on a terminal). Running it
    again with the same --session resumes the conversation from the store instead of recomputing it.
    """
    from .chat import run_chat, stdin_lines
    from .models import ModelNotInstalledError, load_default_model
    from .tiers.session_store import check_name

    cfg = _load(config)
    with _user_errors():
        check_name(session)  # before the model loads
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF conversion bars; hkv's own prefill bar stays
    try:
        model, tokenizer = load_default_model()
    except ModelNotInstalledError as error:
        raise _fail(str(error)) from None
    tty = sys.stdout.isatty()
    with _user_errors():
        run_chat(model, tokenizer, stdin_lines(), session=session, config=cfg, max_new_tokens=max_new_tokens,
                 system=system, echo=typer.echo, stream=tty)  # fmt: skip


@app.command("demo")
def demo(
    tokens: Annotated[int, typer.Option(min=128, help="passkey prompt length in tokens (first run only)")] = 4096,  # hkv.demo.DEFAULT_TOKENS
    config: ConfigOption = None,
    store: StoreOption = None,
    session: Annotated[str, typer.Option("--session", "-s", help="session the conversation is saved under")] = "demo",
    depth: Annotated[float, typer.Option(min=0.0, max=1.0, help="where the passkey sits in the prompt, 0 (start) to 1 (end)")] = 0.5,
    fresh: Annotated[bool, typer.Option("--fresh", help="delete the saved session first and start over")] = False,
    answer_tokens: Annotated[int, typer.Option(min=1, help="reply tokens to generate (more give a steadier decode figure)")] = 8,  # hkv.demo.ANSWER_TOKENS
    json_path: JsonOption = None,
) -> None:
    """The main job: a long passkey prompt on the default model, saved as a session a second run resumes.

    First run: prefill a passkey prompt of --tokens tokens (progress bar), answer it, print tier
    occupancy, prefetch statistics and timings, save the session. Later runs resume the session
    from the store and ask a follow-up question instead of prefilling again.
    """
    from .demo import demo_config, drop_session, report_lines, run_demo
    from .models import ModelNotInstalledError, load_default_model
    from .tiers.session_store import check_name

    try:
        cfg = demo_config(_load(config), store)
    except ConfigError as error:  # --store names a file
        raise _fail(str(error), 2) from None
    with _user_errors():
        check_name(session)  # before the model loads
        if fresh and drop_session(cfg, session):
            typer.echo(f"deleted session {session!r} from {cfg.tiers.path}")
    start = time.perf_counter()
    try:
        model, tokenizer = load_default_model()
    except ModelNotInstalledError as error:
        raise _fail(str(error)) from None
    load_s = time.perf_counter() - start
    with _user_errors():
        result = run_demo(model, tokenizer, cfg, name=session, tokens=tokens, depth=depth, progress=True,
                          answer_tokens=answer_tokens)  # fmt: skip
    result.load_s = load_s
    for line in report_lines(result):
        typer.echo(line)
    _write_json(json_path, result.as_dict())


@sessions_app.command("ls")
def sessions_ls(store: StoreOption = None, config: ConfigOption = None) -> None:
    """A table of the store's sessions, most recently used first (read without a model)."""
    path = _store_path(store, config)
    with _open_store(path) as opened, _user_errors():
        infos = opened.list()
    if not infos:
        typer.echo(f"no sessions in {path}")
        return
    headers = ("name", "tokens", "kv tokens", "blocks", "bytes", "shared", "model", "last used")
    rows = []
    for info in infos:
        if info.tokens < 0:
            rows.append((info.name, "CORRUPT", "-", "-", "-", "-", f"run `hkv sessions verify {info.name}`", "-"))
            continue
        rows.append((info.name, str(info.tokens), str(info.kv_tokens), str(info.kv_blocks * info.num_layers),
                     _size(info.stored_bytes), str(info.shared_blocks), info.model, _when(info.last_used)))  # fmt: skip
    for line in _table(headers, rows, right=(1, 2, 3, 4, 5)):
        typer.echo(line)


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...]) -> list[str]:
    """Lines of a plain text table, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(headers)] + [line(row) for row in rows]


@sessions_app.command("show")
def sessions_show(
    name: Annotated[str, typer.Argument(help="session name")], store: StoreOption = None, config: ConfigOption = None
) -> None:
    """One session: tokens, blocks (on disk: no process holds them here), bytes, model, times."""
    with _open_store(_store_path(store, config)) as opened, _user_errors():
        info = opened.info(name)
    blocks = info.kv_blocks * info.num_layers
    rows = [
        ("name", info.name),
        ("tokens", f"{info.tokens} ({info.kv_tokens} with stored KV)"),
        ("blocks", f"{blocks} on disk ({info.kv_blocks} per layer x {info.num_layers} layers), {info.shared_blocks} shared"
                   + (f", {info.missing_blocks} MISSING" if info.missing_blocks else "")),  # fmt: skip
        ("bytes", f"{info.stored_bytes} ({_size(info.stored_bytes)})"),
        ("model", info.model),
        ("created", _when(info.created)),
        ("updated", _when(info.updated)),
        ("last used", _when(info.last_used)),
        ("commits", str(info.commits)),
    ]
    for label, value in rows:
        typer.echo(f"{label + ':':<12} {value}")


@sessions_app.command("rm")
def sessions_rm(
    name: Annotated[str, typer.Argument(help="session name")],
    store: StoreOption = None,
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete a session; blocks no other session references are freed."""
    with _open_store(_store_path(store, config), readonly=False) as opened, _user_errors():
        info = opened.info(name)  # SessionNotFoundError before asking
        if not yes and sys.stdin.isatty() and not typer.confirm(f"delete session {name!r} ({info.tokens} tokens)?"):
            raise typer.Exit(1)
        result = opened.delete(name)
    typer.echo(f"deleted session {name!r}: {len(result.deleted)} blocks freed ({_size(result.freed_bytes)})")


@sessions_app.command("verify")
def sessions_verify(
    name: Annotated[Optional[str], typer.Argument(help="session name (all sessions if omitted)")] = None,
    store: StoreOption = None,
    config: ConfigOption = None,
) -> None:
    """Re-check every checksum (records, tails, summaries, blocks); exit 1 listing any problem."""
    with _open_store(_store_path(store, config)) as opened, _user_errors():
        report = opened.verify(name)
    if not report.ok:
        for session, problems in sorted(report.problems.items()):
            for problem in problems:
                typer.echo(f"{session}: {problem}")
        bad = sum(1 for problems in report.problems.values() if problems)
        raise _fail(f"{bad} session(s) failed verification ({report.checked_blocks} blocks checked)")
    typer.echo(f"ok, {report.checked_blocks} blocks, {report.checked_bytes} bytes checked")


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
    from .bench.resume import print_table, run_resume_bench

    cfg = _load(config) if config is not None else None
    lengths = _lengths(tokens, "--tokens")
    figures = run_resume_bench(cfg, tokens=lengths, weights=weights, fill=fill, reprefill_max=reprefill_max or None)
    print_table(figures)
    _write_json(json_path, figures)


if __name__ == "__main__":  # pragma: no cover
    app()
