"""Eviction policies (hkv.tiers.policy): LRU order and decaying attention scores."""

from __future__ import annotations

import pytest

from hkv.blocks import BlockKey
from hkv.tiers.policy import LRUPolicy, ScorePolicy, make_policy


def key_of(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def test_lru_policy_keeps_order():
    keys = [key_of(i) for i in range(3)]
    assert list(LRUPolicy().rank(keys)) == keys
    assert isinstance(make_policy("lru"), LRUPolicy) and isinstance(make_policy("score"), ScorePolicy)
    with pytest.raises(ValueError, match="tiers.policy = 'mru'"):
        make_policy("mru")


def test_score_policy_evicts_low_recent_scores_first():
    policy = ScorePolicy(decay=0.5)
    a, b, c = key_of(1), key_of(2), key_of(3)
    policy.note_scores([a, b], [1.0, 0.1])
    assert list(policy.rank([a, b, c])) == [c, b, a]  # never scored = 0, then low, then high
    for _ in range(6):  # a's score decays while b keeps being noted
        policy.note_scores([b], [0.1])
    assert list(policy.rank([a, b])) == [a, b]
    policy.forget(b)
    assert list(policy.rank([b, a])) == [b, a]
    with pytest.raises(ValueError, match="decay"):
        ScorePolicy(decay=0)
