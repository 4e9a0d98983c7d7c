"""The ``hkv`` command: config checks and benchmarks.

Heavy imports (the benchmarks, transformers) happen inside the commands, so ``hkv config``
answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .config import Config, ConfigError

app = typer.Typer(help="hkv: tiered, attention-guided KV cache for long contexts.", no_args_is_help=True)
config_app = typer.Typer(help="Check and show configuration files.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print a table and, with --json, write their figures.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file")]
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


def _write_json(path: Path | None, figures: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        typer.echo(f"wrote {path}")


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
    contexts: Annotated[str, typer.Option(help="comma-separated context lengths in tokens")] = "8192,32768,131072",
    steps: Annotated[int, typer.Option(help="decode steps timed per context (median reported)")] = 16,
) -> None:
    """Decode latency per token, hkv sparse vs transformers' DynamicCache, same model shape."""
    from .bench.decode import print_table, run_decode_bench

    # Without --config the benchmark sizes the host tier itself so that 128K tokens fit in RAM.
    cfg = _load(config) if config is not None else None
    lengths = tuple(int(part) for part in contexts.split(",") if part.strip())
    figures = run_decode_bench(cfg, contexts=lengths, steps=steps)
    print_table(figures)
    _write_json(json_path, figures)


if __name__ == "__main__":  # pragma: no cover
    app()
