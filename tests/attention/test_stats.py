"""SequenceStats: the prefetch hit rate and precision a sequence reports."""

from __future__ import annotations

from hkv.attention.stats import SequenceStats


def test_hit_rate_is_hits_over_blocks_read_not_over_blocks_predicted() -> None:
    stats = SequenceStats(predicted=40, needed=30, hit=30)
    assert stats.hit_rate == 1.0 and stats.precision == 0.75
    assert SequenceStats().hit_rate is None and SequenceStats().precision is None
