"""`hkv bench remote` on a real redis-server: both reads measured over the same bytes, and the
server left as it was found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis


def test_bench_remote_measures_both_reads_and_cleans_up(redis_server, cli, tmp_path: Path) -> None:
    out = tmp_path / "remote.json"
    result = cli("bench", "remote", "--url", redis_server.url, "--blocks", "64", "--repeats", "1", "--json", str(out))
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())["reads"]
    assert figures["blocks"] == 64 and figures["record_bytes"] == 64 * (49152 + 64)
    assert figures["tier_read_gbps"] > 0 and figures["raw_get_gbps"] > 0
    assert figures["ratio"] == pytest.approx(figures["tier_read_gbps"] / figures["raw_get_gbps"], rel=0.1)  # rounded figures
    assert redis.Redis.from_url(redis_server.url).dbsize() == 0
