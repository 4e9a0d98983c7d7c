"""Every block the attention reads is counted in exactly one bucket of its step's statistics:
``read = pinned + hit + unpredicted + waited + fetched`` (hkv.attention.stats.StepStats), with
prefetch on and off, in sparse and exact mode, on a SequenceKV fed random KV and through
``hkv.wrap`` on a tiny random model; and the manager's GatherReport names the blocks it did not
find on the device (``late_keys``), which is what the classification rests on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers.models import prompt, tiny_lm, wrap_config
from helpers.sequences import LAYERS, Driver, make_config, open_sequence
from hkv.attention.stats import StepStats
from hkv.prefetch.prefetcher import Prefetcher
from hkv.tiers.promotion import GatherReport

BLOCK = 4


def assert_partitioned(s: StepStats) -> None:
    buckets = s.read_buckets
    assert set(buckets) == {"pinned", "hit", "unpredicted", "waited", "fetched"}
    assert min(buckets.values()) >= 0, buckets
    assert s.read == sum(buckets.values()), (s.read, buckets)
    assert s.needed == s.read - s.pinned == s.hit + s.unpredicted + s.waited + s.fetched, s
    assert s.resident == s.pinned + s.hit + s.unpredicted, s
    assert (s.late, s.missed) == (s.waited, s.fetched), s


def _drive(tmp_path: Path, *, prefetch: bool, mode: str, device_blocks: int = 12, settle: bool = False):
    """50 tokens of prefill in one append, then 12 decode steps; returns (stats, history, tokens per decode step).
    ``settle``: wait for the prefetcher's work of each step before the next one."""
    config = make_config(tmp_path, mode=mode, block=BLOCK, sink=4, local=4, budget=16, chunk=8,
                         device_blocks=device_blocks, host_blocks=4, prefetch=prefetch)  # fmt: skip
    prefetcher = Prefetcher(None, workers=2) if prefetch else None
    manager, seq = open_sequence(config, prefetcher=prefetcher)
    if prefetcher is not None:
        prefetcher.manager = manager
    try:
        driver = Driver(seq, manager, seed=3)
        driver.step(50)
        totals = []
        for _ in range(12):
            if settle:  # the previous step's prefetches done: whether a predicted block is a hit no longer depends on timing
                for ticket in seq._tickets:
                    if ticket is not None:
                        ticket.wait()
            driver.step(1)
            totals.append(seq.seq_length())
        return seq.stats(), list(seq.history), totals
    finally:
        seq.close()
        if prefetcher is not None:
            prefetcher.close()
        manager.close()


@pytest.mark.parametrize("mode", ["sparse", "exact"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch-on", "prefetch-off"])
def test_every_block_read_is_in_one_bucket(tmp_path: Path, prefetch: bool, mode: str) -> None:
    stats, history, _ = _drive(tmp_path, prefetch=prefetch, mode=mode, settle=prefetch)
    assert_partitioned(stats)
    assert stats.last is not None
    for step in [*history, stats.last]:
        assert_partitioned(step)
    # a device tier of 12 blocks (2 layers x 2 pinned + 8): most reads come from the host or disk
    assert stats.read > 0 and stats.pinned > 0 and stats.fetched > 0, stats
    if not prefetch:
        assert stats.predicted == 0 and stats.hit == 0, stats
    elif mode == "sparse":
        assert stats.predicted > 0 and stats.hit > 0, stats


def test_exact_mode_counts_every_past_block_once(tmp_path: Path) -> None:
    """Exact mode reads every sealed block before the fresh window: a decode step at ``T`` tokens
    reads ``(T - 1) // block`` blocks per layer, and ``read`` counts exactly those."""
    stats, history, totals = _drive(tmp_path, prefetch=True, mode="exact")
    decode_steps = [*history[1:], stats.last]  # history[0]: the prefill forward
    assert len(decode_steps) == len(totals) == 12
    for step, tokens in zip(decode_steps, totals):
        assert step.read == LAYERS * ((tokens - 1) // BLOCK), (step, tokens)


def test_everything_on_the_device_is_pinned_hit_or_unpredicted(tmp_path: Path) -> None:
    """A device tier that holds the whole KV: nothing waited for or fetched, so the reads are
    pinned, hits and unpredicted blocks only -- the case where the demo's first run printed a
    hit rate whose blocks added up to only 3/4 of the blocks read. Decode steps read such layers
    through their device-side block tables: nothing is predicted for them (nothing needs
    moving), so their blocks count as unpredicted, as the prefill's do."""
    stats, history, _ = _drive(tmp_path, prefetch=True, mode="sparse", device_blocks=64)
    assert_partitioned(stats)
    assert (stats.waited, stats.fetched) == (0, 0), stats
    assert stats.table_reads == LAYERS * (len(history) - 1 + 1), stats  # every decode step's layer (history[0]: the prefill)
    assert stats.unpredicted == stats.needed > 0 and stats.hit == 0, stats
    assert stats.read == stats.pinned + stats.hit + stats.unpredicted


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch-on", "prefetch-off"])
def test_runtime_stats_partition_the_reads(tmp_path: Path, prefetch: bool) -> None:
    import hkv

    model = tiny_lm()
    config = wrap_config(model, tmp_path, mode="sparse", prefetch=prefetch)
    ids = prompt(300)
    with hkv.wrap(model, config) as rt, rt.new_cache() as cache:
        with torch.inference_mode():
            model.generate(ids, cache=cache, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)  # fmt: skip
        stats = rt.stats().prefetch
    assert stats is not None
    assert_partitioned(stats)
    assert stats.read > stats.needed > 0 and stats.fetched > 0, stats
    if not prefetch:
        assert stats.predicted == 0 and stats.hit == 0, stats


def test_gather_report_names_the_blocks_not_on_the_device(tmp_path: Path) -> None:
    config = make_config(tmp_path, mode="exact", block=BLOCK, device_blocks=8, host_blocks=4)
    manager, seq = open_sequence(config)
    try:
        Driver(seq, manager, seed=5).step(60)  # 15 blocks a layer: most of them below the device
        keys = seq.block_keys(0)
        away = manager.missing_from_device(keys)[:2]
        here = [key for key in keys if key not in set(away)][:1]  # the first block: pinned sink
        assert len(away) == 2 and not manager.missing_from_device(here)
        report = GatherReport(late_keys=set())
        manager.gather(here + away, report=report)
        assert (report.resident, report.waited, report.fetched) == (1, 0, 2)
        assert report.late_keys == {key.digest for key in away}
        plain = GatherReport()  # without a set nothing is collected
        manager.gather(away, report=plain)
        assert plain.late_keys is None and plain.resident + plain.waited + plain.fetched == 2
    finally:
        seq.close()
        manager.close()
