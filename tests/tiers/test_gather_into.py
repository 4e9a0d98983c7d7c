"""Promotion.gather_into, the decode step's read: the same bytes as gather, wherever the blocks
are (device, host, disk only, more than the device can take), each block counted once."""

from __future__ import annotations

import pytest
import torch

from hkv.blocks import BlockKey, BlockLayout
from hkv.config import Config
from hkv.tiers.manager import GatherReport, TierManager

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float32)


def _key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def _block(i: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape, generator=torch.Generator().manual_seed(i))


@pytest.fixture
def manager(tmp_path):
    """Device 4 blocks, host 6, the rest on disk; blocks 0..11 put in order (0..1 end on disk)."""
    config = Config(tiers={"device": 4 * LAYOUT.nbytes, "host": 6 * LAYOUT.nbytes, "disk": 64 * LAYOUT.record_nbytes,
                           "path": str(tmp_path / "store")})  # fmt: skip
    with TierManager(config, LAYOUT, device="cpu") as m:
        for i in range(12):
            m.put(_key(i), _block(i))
        yield m


def _read(manager: TierManager, indices: list[int], report: GatherReport | None = None) -> torch.Tensor:
    """``[2, Hkv, n * T, D]`` through gather_into, into a buffer with a spare column behind it."""
    n, (_, h, t, d) = len(indices), LAYOUT.shape
    buffer = torch.full((2, h, n * t + 3, d), float("nan"))
    manager.gather_into([_key(i).digest for i in indices], buffer[:, :, : n * t].view(2, h, n, t, d), report=report)
    assert buffer[:, :, n * t :].isnan().all()  # nothing written past the view
    return buffer[:, :, : n * t]


def _expected(indices: list[int]) -> torch.Tensor:
    blocks = torch.stack([_block(i) for i in indices])  # [n, 2, Hkv, T, D]
    return blocks.permute(1, 2, 0, 3, 4).reshape(2, LAYOUT.kv_heads, -1, LAYOUT.head_dim)


@pytest.mark.parametrize("indices", [[11, 10, 8], [3, 11, 0, 7, 1], [0, 1], list(range(12))])
def test_gather_into_reads_the_blocks_bitwise_wherever_they_are(manager: TierManager, indices: list[int]) -> None:
    where = {i: manager.where(_key(i)) for i in indices}
    report = GatherReport(late_keys=set())
    out = _read(manager, indices, report)
    assert torch.equal(out, _expected(indices))
    # each block once: on the device at once, or fetched (from the host without a promotion on a CPU, from disk by one)
    assert report.resident + report.waited + report.fetched == len(indices)
    if len(indices) <= 4:  # more than the device holds: read in waves, which move blocks between them
        assert report.resident == sum("device" in where[i] for i in indices)
        assert report.late_keys == {_key(i).digest for i in indices if "device" not in where[i]}


def test_gather_into_matches_gather(manager: TierManager) -> None:
    indices = [2, 9, 5, 11]
    out = _read(manager, indices)
    gathered = manager.gather([_key(i) for i in indices])  # [n, 2, Hkv, T, D]
    assert torch.equal(out, gathered.permute(1, 2, 0, 3, 4).reshape(out.shape))
    assert torch.equal(_read(manager, indices), out)  # again, with the blocks placed differently now


def test_gather_into_on_a_cpu_reads_host_blocks_without_promoting_them(manager: TierManager) -> None:
    host_only = [i for i in range(12) if manager.where(_key(i)) == frozenset({"host"})]
    assert host_only and manager.shared_rows is not None
    before = {i: manager.where(_key(i)) for i in range(12)}
    report = GatherReport(late_keys=set())
    _read(manager, host_only, report)
    assert {i: manager.where(_key(i)) for i in range(12)} == before  # nothing moved, nothing evicted
    assert report.resident == len(host_only) and report.fetched == 0 and not report.late_keys  # RAM is resident here
    assert manager.stats().moved_bytes["host->device"] == 0


def test_gather_into_on_a_cpu_brings_disk_blocks_to_the_host_alone(manager: TierManager) -> None:
    on_disk = [i for i in range(12) if manager.where(_key(i)) == frozenset({"disk"})]
    in_ram = [i for i in range(12) if "device" in manager.where(_key(i))][:1]
    assert on_disk and in_ram
    report = GatherReport(late_keys=set())
    indices = on_disk + in_ram
    assert torch.equal(_read(manager, indices, report), _expected(indices))
    assert all(manager.where(_key(i)) == frozenset({"host", "disk"}) for i in on_disk)  # read from disk into the host
    assert report.fetched == len(on_disk) and report.resident == len(in_ram)
    assert report.late_keys == {_key(i).digest for i in on_disk}
    assert manager.stats().moved_bytes["host->device"] == 0


@pytest.mark.parametrize("indices", [[2, 3, 4, 10], [5, 9, 10, 11]])  # mostly host rows / mostly device rows
def test_gather_into_on_a_cpu_reads_a_mix_of_host_and_device_blocks_bitwise(manager: TierManager, indices: list[int]) -> None:
    where = {i: manager.where(_key(i)) for i in indices}
    assert {"host"} in where.values() and any("device" in w for w in where.values())  # a mix, nothing from disk
    before = {i: manager.where(_key(i)) for i in range(12)}
    assert torch.equal(_read(manager, indices), _expected(indices))
    assert {i: manager.where(_key(i)) for i in range(12)} == before


@pytest.mark.cuda
def test_cuda_gather_into_promotes_misses_and_reads_the_same_bytes(tmp_path) -> None:
    # On a GPU nothing is read from the host pool directly: misses are promoted (copy stream,
    # events), then one index_select reads every block from the device pool into the buffer.
    config = Config(tiers={"device": 4 * LAYOUT.nbytes, "host": 6 * LAYOUT.nbytes, "disk": 64 * LAYOUT.record_nbytes,
                           "path": str(tmp_path / "store")})  # fmt: skip
    with TierManager(config, LAYOUT, device="cuda") as m:
        for i in range(12):
            m.put(_key(i), _block(i).cuda())
        indices = [3, 11, 0, 7]
        n, (_, h, t, d) = len(indices), LAYOUT.shape
        out = torch.empty(2, h, n, t, d, device="cuda")
        report = GatherReport(late_keys=set())
        m.gather_into([_key(i).digest for i in indices], out, report=report)
        assert torch.equal(out.reshape(2, h, n * t, d).cpu(), _expected(indices))
        assert report.resident + report.waited + report.fetched == n
        assert all("device" in m.where(_key(i)) for i in indices)  # promoted, not read from the host


def test_a_cpu_prefetches_to_the_host_and_skips_blocks_in_ram(manager: TierManager) -> None:
    """Pools sharing one tensor: a prefetch brings a disk block to the host alone, and blocks on
    the device or the host are not asked for again."""
    assert manager.prefetch_tier == "host"
    where = {i: manager.where(_key(i)) for i in range(12)}
    on_disk = [i for i in range(12) if where[i] == frozenset({"disk"})]
    assert on_disk and manager.missing_from([_key(i) for i in range(12)], "host") == [_key(i) for i in on_disk]
    manager.promote([_key(on_disk[0])], manager.prefetch_tier)
    assert manager.where(_key(on_disk[0])) == frozenset({"host", "disk"})
    assert manager.stats().moved_bytes["host->device"] == 0
