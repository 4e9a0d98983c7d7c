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


def test_a_failing_reader_fails_the_read_measurement(tmp_path: Path, monkeypatch) -> None:
    import pytest
    import torch

    from hkv.bench import disk as bench_disk
    from hkv.blocks import BlockKey, BlockLayout
    from hkv.errors import TierError
    from hkv.tiers.disk import DiskTier

    layout = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
    keys = [BlockKey(i.to_bytes(16, "little")) for i in range(8)]
    with DiskTier(tmp_path / "store", layout, 8 * layout.record_nbytes) as tier:
        tier.put_many(keys, torch.zeros(8, *layout.shape, dtype=layout.dtype))
    assert bench_disk._tier_read(tmp_path / "store", layout, keys, 2, 2) > 0

    def failing_read(self, batch, out):
        raise TierError("read failed")

    monkeypatch.setattr(DiskTier, "get_many_into", failing_read)
    with pytest.raises(TierError, match="read failed"):
        bench_disk._tier_read(tmp_path / "store", layout, keys, 2, 2)
