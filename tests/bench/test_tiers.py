"""Smoke test of `hkv bench tiers`' host <-> device half (hkv.bench.tiers): block moves, the figures
and the table, on the CPU."""

from __future__ import annotations

import torch

from hkv.blocks import BlockLayout
from hkv.config import Config

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
NB = LAYOUT.nbytes


def test_tiers_bench_smoke(tmp_path):
    import hkv.bench.tiers as bench

    moves = bench.measure_block_moves(8 * LAYOUT.nbytes, torch.device("cpu"), layout=LAYOUT, repeats=2, folder=tmp_path)
    assert moves["blocks"] == 8 and all(moves[k] > 0 for k in ("h2d_gbps", "d2h_gbps", "plain_h2d_gbps", "plain_d2h_gbps"))
    config = Config(tiers={"path": str(tmp_path / "store")})
    result = bench.run_tiers_bench(config, move_bytes=16 * NB, disk_bytes=2**20, repeats=1, disk=False, layout=LAYOUT)
    for key in ("h2d_gbps", "d2h_gbps", "memcpy_gbps", *bench.DISK_KEYS, "h2d_ratio", "d2h_ratio"):
        assert key in result
    assert result["blocks"] == 16 and result["disk_read_gbps"] is None
    table = bench.format_table(result)
    assert "host -> device" in table and "n/a" in table
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("hkv-bench-")]  # its scratch folder is removed
