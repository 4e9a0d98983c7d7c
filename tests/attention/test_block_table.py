"""Decode steps through the device-side block tables (hkv/attention/block_table.py): bitwise the
host path's result whatever the residency, a fall back when a block leaves the device, and (on
a GPU) no device -> host synchronisation inside a layer's attention."""

from __future__ import annotations

import pytest
import torch

import hkv.attention.sequence
from hkv.config import Config
from hkv.positions import RotaryShift

from helpers.sequences import HKV, LAYERS, D, Driver, attend_without_syncs, make_config, opened_sequence


ROTARY = RotaryShift(torch.tensor([1.0, 0.3, 0.05, 0.002], dtype=torch.float64))  # all 8 dims of D rotate


def _decode_outputs(config, *, tables: bool, device: str, steps: int) -> tuple[list[torch.Tensor], object]:
    """Every layer's output of a 37-token prefill and ``steps`` decode steps, and the stats."""
    rotary = ROTARY if config.attention.positions == "remap" else None
    with opened_sequence(config, device=device, rotary=rotary) as (manager, seq):
        seq._table_reads = tables
        driver = Driver(seq, manager, seed=11)
        outputs = [out for out, _ in driver.step(37)]
        for _ in range(steps):
            outputs += [out for out, _ in driver.step(1)]
        return outputs, seq.stats()


def _config(path, mode: str, device_blocks: int):
    positions = "original" if mode in ("sparse", "exact") else "remap"
    config = make_config(path, mode="exact" if mode == "exact" else "sparse", sink=4, local=8, budget=24,
                         device_blocks=device_blocks, host_blocks=40)
    return Config.load(config, attention={"positions": positions}, env={})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("mode", ["sparse", "remap", "exact"])
@pytest.mark.parametrize("device_blocks", [64, 9], ids=["kv-fits", "kv-overflows"])
@pytest.mark.parametrize("piece_blocks", [None, 3], ids=["one-piece", "pieces-of-3"])
def test_table_reads_are_bitwise_the_host_reads(tmp_path, monkeypatch, device: str, mode: str, device_blocks: int,
                                                piece_blocks: int | None) -> None:  # fmt: skip
    """Same prompt, with and without block tables: the same bits at every layer of every step,
    blocks sealed as it goes (4-token blocks), the KV all on the device or mostly off it; with
    ``positions = "remap"`` the far blocks are moved by rows picked on the device."""
    if piece_blocks is not None:
        monkeypatch.setattr(hkv.attention.sequence, "PIECE_KV_ELEMENTS", piece_blocks * 2 * HKV * 4 * D)
    with_tables, stats = _decode_outputs(_config(tmp_path, mode, device_blocks), tables=True, device=device, steps=14)
    host_path, host_stats = _decode_outputs(_config(tmp_path / "host", mode, device_blocks), tables=False, device=device, steps=14)
    assert len(with_tables) == len(host_path)
    for a, b in zip(with_tables, host_path):
        assert torch.equal(a, b)
    assert host_stats.table_reads == 0
    if device_blocks == 64:  # every decode step of every layer went through its table
        assert stats.table_reads == 14 * LAYERS, stats
    assert stats.read == host_stats.read and stats.pinned == host_stats.pinned


def test_a_block_leaving_ram_sends_the_read_through_the_host_path(tmp_path) -> None:
    """Without a GPU the device and host pools are rows of one tensor and the tables read both: a
    block moved to the host is still read through its layer's table (rebuilt: the epoch moved),
    in place, nothing fetched. A block on disk alone makes the table stale: the next read goes
    through the host path (and fetches it), still exact; once the block is back, the rebuilt table."""
    config = make_config(tmp_path, mode="exact", device_blocks=64, host_blocks=40)
    with opened_sequence(config) as (manager, seq):
        assert manager.shared_rows is not None
        driver = Driver(seq, manager, seed=5)
        driver.check_exact(driver.step(30))
        driver.check_exact(driver.step(1))
        assert seq.step_stats().table_reads == LAYERS
        key = seq.block_keys(0)[3]  # neither sink nor local: may move
        manager.demote([key], to="host")
        assert manager.where(key) == frozenset({"host"})
        driver.check_exact(driver.step(1))
        step = seq.step_stats()
        assert step.table_reads == LAYERS and step.fetched == 0 and step.resident == step.read, step
        assert manager.where(key) == frozenset({"host"})  # read where it is, not promoted
        manager.demote([key], to="disk")
        assert manager.where(key) == frozenset({"disk"})
        driver.check_exact(driver.step(1))
        step = seq.step_stats()
        assert step.table_reads == LAYERS - 1 and step.fetched == 1, step
        for _ in range(2):  # the block came back with the fetch: the table is rebuilt at a later try
            driver.check_exact(driver.step(1))
        assert seq.step_stats().table_reads == LAYERS


def test_pools_share_one_tensor_only_where_both_are_raw_ram(tmp_path) -> None:
    """The shared rows: the device pool's slots first, then the host pool's, one allocation; an
    encoded host tier keeps its own tensor (tables then read the device alone)."""
    with opened_sequence(make_config(tmp_path, mode="exact", device_blocks=16, host_blocks=8)) as (manager, _):
        shared = manager.shared_rows
        assert shared is not None and shared.offset == manager.device_pool.n_slots
        assert manager.device_pool.data.data_ptr() == shared.data.data_ptr()
        assert manager.host_pool.data.data_ptr() == shared.data[shared.offset].data_ptr()
        assert shared.data.shape[0] == manager.device_pool.n_slots + manager.host_pool.n_slots
    config = Config.load(make_config(tmp_path / "int8", mode="sparse", device_blocks=16, host_blocks=8),
                         tiers={"host_encoding": "int8"}, env={})  # fmt: skip
    with opened_sequence(config) as (manager, _):
        assert manager.shared_rows is None and manager.host_pool.data.dtype == torch.uint8


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["sparse", "remap", "exact"])
def test_attention_over_a_resident_layer_never_synchronises(tmp_path, mode: str) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` around every layer's attention of decode steps
    (blocks sealed on the way): no device -> host transfer or synchronisation in it."""
    config = _config(tmp_path, mode, 64)
    with opened_sequence(config, device="cuda", rotary=ROTARY if mode == "remap" else None) as (manager, seq):
        driver = Driver(seq, manager, seed=7)
        driver.step(37)
        driver.step(1)  # the tables are built at the first decode step
        attend_without_syncs(seq, 9)
        assert seq.stats().table_reads >= 9 * LAYERS
