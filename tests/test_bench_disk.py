"""Smoke test of the disk half of the tier benchmark: it runs and reports every figure."""

from __future__ import annotations

from pathlib import Path

from hkv.bench.disk import DiskFigures, measure_disk


def test_measure_disk_reports_positive_figures(tmp_path: Path) -> None:
    figures = measure_disk(tmp_path / "bench", total_bytes=16 * 2**20, repeats=1)
    assert isinstance(figures, DiskFigures)
    found = figures.as_dict()
    for key in ("disk_read_gbps", "disk_write_gbps", "raw_disk_read_gbps", "raw_disk_write_gbps"):
        assert found[key] > 0, key
    assert found["read_cache"] in ("cold", "warm")
    assert found["block_bytes"] == 48 * 1024 and found["total_bytes"] == found["blocks"] * found["block_bytes"]
    assert list((tmp_path / "bench").iterdir()) == []  # cleaned up
