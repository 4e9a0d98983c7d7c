"""Assertions on ``typer.testing.CliRunner`` results."""

from __future__ import annotations

from typing import Any


def assert_clean_error(result: Any, *words: str) -> None:
    """Non-zero exit, one ``error:`` line naming ``words``, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    for word in words:
        assert word in line, result.output
