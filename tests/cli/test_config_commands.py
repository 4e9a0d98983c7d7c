"""The `hkv config` commands: output and exit codes."""

from __future__ import annotations

from pathlib import Path


def test_config_check_ok_and_show(cli, tmp_path: Path) -> None:
    path = tmp_path / "hkv.toml"
    path.write_text('[tiers]\nhost = "1GiB"\n')
    result = cli("config", "check", str(path))
    assert result.exit_code == 0 and "ok" in result.output
    shown = cli("config", "show", str(path))
    assert shown.exit_code == 0
    assert f"host = {2**30}" in shown.output and "[attention]" in shown.output


def test_config_check_reports_error_with_non_zero_exit(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[tiers]\nhost = 0\nhots = "1GiB"\n')
    result = cli("config", "check", str(path))
    assert result.exit_code == 2
    assert "tiers.host = 0" in result.output and "tiers.hots: unknown key" in result.output


def test_config_show_applies_environment(cli) -> None:
    result = cli("config", "show", env={"HKV_TIERS__DEVICE": "64MiB"})
    assert result.exit_code == 0 and f"device = {64 * 2**20}" in result.output
