"""What the ``hkv`` commands share: loading the config, one-line errors, options, JSON output, tables."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..config import Config, ConfigError
from ..errors import TierError

# Help texts are Markdown: typer reflows each docstring paragraph to the terminal width (the
# default "rich" mode keeps the docstring's own line breaks, cutting lines mid-phrase).
HELP_MARKUP = "markdown"

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file")]
StoreOption = Annotated[Optional[Path], typer.Option("--store", help="store folder (default: tiers.path of --config)")]
JsonOption = Annotated[Optional[Path], typer.Option("--json", help="write the figures to this JSON file")]


def load(path: Path | None) -> Config:
    try:
        return Config.load(path)
    except ConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


def parse_lengths(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated token counts; exit 2 with one line if one is not a positive integer."""
    try:
        lengths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        typer.echo(f"error: {option} {text!r}: expected comma-separated positive token counts, e.g. 2048,8192", err=True)
        raise typer.Exit(2)
    return lengths


def write_json(path: Path | None, figures: dict[str, Any], *, quiet: bool = False) -> None:
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


def choices(text: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated names among ``allowed``; exit 2 with one line otherwise."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        typer.echo(f"error: {option} {text!r}: expected comma-separated names among {', '.join(allowed)}", err=True)
        raise typer.Exit(2)
    return names


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned Exit."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the store's and sessions' errors into one line on stderr and exit 1 (no traceback)."""
    try:
        yield
    except (TierError, ConfigError, FileNotFoundError, PermissionError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise fail(str(message)) from None


def human_bytes(nbytes: int) -> str:
    """``512 B``, ``1.5 KiB`` ... ``2.0 GiB`` (the demo's report and the ``hkv sessions`` tables)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"  # pragma: no cover


def table(headers: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...]) -> list[str]:
    """Lines of a plain text table, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(headers)] + [line(row) for row in rows]
