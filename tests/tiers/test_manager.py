"""The tier manager: placement, budgets, pins, refcounts, persistence, stats, concurrency."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from hkv.blocks import BlockKey, BlockLayout
from hkv.config import Config, ConfigError
from hkv.errors import BlockNotFoundError, TierError, TierFullError
from hkv.tiers.disk import DiskTier
from hkv.tiers.manager import GatherReport, TierManager

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
NB, REC = LAYOUT.nbytes, LAYOUT.record_nbytes


def key_of(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def block_of(i: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape, generator=torch.Generator().manual_seed(i)).to(LAYOUT.dtype)


def blocks_of(indices) -> torch.Tensor:
    return torch.stack([block_of(i) for i in indices])


@pytest.fixture
def make(tmp_path):
    """``make(device=blocks, host=blocks, disk=blocks, **config sections)`` -> an open TierManager."""
    made: list[TierManager] = []

    def factory(device: int = 2, host: int = 2, disk: int = 16, *, tiers: dict | None = None, store: dict | None = None, path=None):
        config = Config(
            tiers={"device": device * NB, "host": host * NB, "disk": disk * REC, "path": str(path or tmp_path / "store"), **(tiers or {})},
            store=store or {},
        )
        manager = TierManager(config, LAYOUT, device="cpu")
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        manager.close()


def put_range(manager: TierManager, indices) -> None:
    indices = list(indices)
    manager.put_many([key_of(i) for i in indices], blocks_of(indices))


def check_all(manager: TierManager, indices) -> None:
    for i in indices:
        assert torch.equal(manager.read(key_of(i)), block_of(i)), i


def check_budgets(manager: TierManager) -> None:
    for name, usage in manager.stats().tiers.items():
        assert usage.used_bytes <= usage.capacity_bytes, name


# -- construction -------------------------------------------------------------------------------


def test_budget_smaller_than_one_block_names_the_key(tmp_path):
    config = Config(tiers={"device": NB - 1, "path": str(tmp_path / "s")})
    with pytest.raises(ConfigError, match=rf"tiers.device = {NB - 1} bytes: smaller than one block"):
        TierManager(config, LAYOUT)


def test_disk_budget_smaller_than_one_record(tmp_path):
    config = Config(tiers={"disk": NB, "path": str(tmp_path / "s")})
    with pytest.raises(ConfigError, match=rf"tiers.disk = {NB} bytes: smaller than one disk record"):
        TierManager(config, LAYOUT)


def test_device_from_config_and_lazy_disk(tmp_path):
    config = Config(tiers={"device": 2 * NB, "host": 2 * NB, "path": str(tmp_path / "s"), "accelerator": "cpu"})
    with TierManager(config, LAYOUT) as manager:
        assert manager.device == torch.device("cpu")
        manager.put(key_of(0), block_of(0))
        assert not (tmp_path / "s").exists()  # nothing spilled, no store yet
    manager.close()  # idempotent after the context manager closed it


# -- placement and round trips ------------------------------------------------------------------


def test_blocks_overflow_down_the_tiers_and_read_back_bitwise(make):
    manager = make(device=2, host=3, disk=16)
    for i in range(10):
        manager.put(key_of(i), block_of(i))
    stats = manager.stats()
    # Once the host overflowed (block 0 spilled when block 3 came down), every block entering the
    # host got a disk copy at once: 3 and 4 were then dropped from the host, not spilled, and the
    # host's last three blocks have copies too. Each block was written once.
    assert [stats.tiers[t].blocks for t in ("device", "host", "disk")] == [2, 3, 8]
    assert stats.blocks == 10
    assert manager.where(key_of(9)) == {"device"}  # newest on the device
    assert manager.where(key_of(0)) == {"disk"}  # oldest spilled to disk
    assert manager.where(key_of(2)) == {"disk"}  # spilled before the host overflowed
    assert manager.where(key_of(7)) == {"host", "disk"}  # entered the host after it overflowed
    assert manager.where(key_of(99)) == frozenset() and not manager.contains(key_of(99))
    check_all(manager, range(10))
    check_budgets(manager)
    assert stats.evictions["device"] == 8 and stats.evictions["host"] == 5
    assert stats.moved_bytes["device->host"] == 8 * NB and stats.moved_bytes["host->disk"] == 8 * NB


def test_a_batch_larger_than_the_device_puts_its_newest_blocks_highest(make):
    manager = make(device=2, host=3, disk=16)
    put_range(manager, range(10))
    # the host's blocks have disk copies too: the batch overflowed the host
    assert [sorted(manager.where(key_of(i))) for i in (0, 4, 5, 7, 8, 9)] == [["disk"]] * 2 + [["disk", "host"]] * 2 + [["device"]] * 2
    assert manager.stats().evictions == {"device": 0, "host": 0, "disk": 0}
    check_all(manager, range(10))


def test_gather_promotes_on_demand_and_reports(make):
    manager = make(device=4, host=2, disk=16)
    put_range(manager, range(8))
    report = GatherReport()
    out = manager.gather([key_of(7), key_of(0), key_of(6), key_of(0)], report=report)
    assert out.shape == (4, *LAYOUT.shape) and out.device.type == "cpu"
    assert torch.equal(out, blocks_of([7, 0, 6, 0]))
    assert (report.resident, report.waited, report.fetched) == (2, 0, 1) and report.stall_s > 0
    assert "device" in manager.where(key_of(0))  # promoted disk -> host -> device
    stats = manager.stats()
    assert stats.moved_bytes["disk->host"] == NB and stats.moved_bytes["host->device"] == NB
    again = GatherReport()
    manager.gather([key_of(0)], report=again)
    assert (again.resident, again.fetched, again.stall_s) == (1, 0, 0.0)
    check_budgets(manager)


def test_gather_errors(make):
    manager = make(device=2, host=2)
    put_range(manager, range(4))
    with pytest.raises(ValueError, match=r"exceeds gather_capacity\(\) = 2"):
        manager.gather([key_of(i) for i in range(3)])
    with pytest.raises(BlockNotFoundError, match="not in the tier manager"):
        manager.gather([key_of(42)])
    assert manager.gather([]).shape == (0, *LAYOUT.shape)


def test_gather_falls_back_to_direct_copy_when_device_room_is_held(make):
    manager = make(device=2, host=2, disk=16)
    put_range(manager, range(6))
    manager.pin([key_of(5)])
    assert manager.gather_capacity() == 1
    out = manager.gather([key_of(5), key_of(0)])  # the pinned block is not counted
    assert torch.equal(out, blocks_of([5, 0]))


def test_reput_is_noop_apart_from_pin_and_recency(make):
    manager = make(device=2, host=2)
    put_range(manager, range(2))
    manager.put(key_of(0), block_of(9))  # data of a known key is not replaced
    assert torch.equal(manager.read(key_of(0)), block_of(0))
    manager.put(key_of(0), block_of(0), pin=True)
    put_range(manager, range(2, 5))
    assert "device" in manager.where(key_of(0))
    manager.put_many([key_of(7), key_of(7)], blocks_of([7, 7]))  # duplicates in one call
    assert manager.stats().blocks == 6


def test_put_validates_shape(make):
    manager = make()
    with pytest.raises(ValueError, match="expected"):
        manager.put_many([key_of(0)], torch.zeros(1, 2, 2, 4, 4, dtype=LAYOUT.dtype))


def test_promote_and_demote(make):
    manager = make(device=3, host=3, disk=16)
    put_range(manager, range(9))  # 6..8 device, 3..5 host, 0..2 disk
    manager.promote([key_of(0)], to="host")
    assert manager.where(key_of(0)) == {"host", "disk"}
    manager.promote([key_of(1), key_of(99)], to="device")  # unknown keys are skipped
    assert "device" in manager.where(key_of(1))
    manager.demote([key_of(1)], to="host")
    assert "device" not in manager.where(key_of(1)) and manager.where(key_of(1))
    manager.demote([key_of(8)], to="disk")
    assert manager.where(key_of(8)) == {"disk"}
    with pytest.raises(ValueError, match="'host' or 'device'"):
        manager.promote([key_of(0)], to="disk")
    with pytest.raises(ValueError, match="'host' or 'disk'"):
        manager.demote([key_of(0)], to="device")
    check_all(manager, range(9))
    check_budgets(manager)


def test_promote_is_best_effort_when_device_is_pinned_full(make):
    manager = make(device=2, host=2, disk=16)
    put_range(manager, range(6))
    manager.pin([key_of(4), key_of(5)])
    manager.promote([key_of(0)])  # no unpinned device room: stops at host, no error
    assert manager.where(key_of(0)) == {"host", "disk"}
    assert manager.gather_capacity() == 0


# -- pins ---------------------------------------------------------------------------------------


def test_pinned_blocks_are_never_evicted(make):
    manager = make(device=3, host=2, disk=32)
    manager.put(key_of(0), block_of(0), pin=True)
    put_range(manager, range(1, 20))
    manager.gather([key_of(i) for i in (1, 2)])
    assert "device" in manager.where(key_of(0))
    manager.demote([key_of(0)], to="disk")  # explicit demotion leaves pinned blocks alone
    assert "device" in manager.where(key_of(0))
    manager.unpin([key_of(0)])
    put_range(manager, range(20, 24))
    assert "device" not in manager.where(key_of(0))
    check_all(manager, range(24))


def test_pin_fails_clearly_when_device_is_full_of_pins(make):
    manager = make(device=2, host=2)
    manager.put_many([key_of(0), key_of(1)], blocks_of([0, 1]), pin=True)
    with pytest.raises(TierFullError, match="cannot pin 1 more blocks: 0 unpinned device slots"):
        manager.put(key_of(2), block_of(2), pin=True)
    assert not manager.contains(key_of(2))
    manager.put(key_of(3), block_of(3))  # unpinned puts go below
    with pytest.raises(TierFullError, match="cannot pin 1 blocks"):
        manager.pin([key_of(3)])
    check_all(manager, [0, 1, 3])


# -- disk budget, refcounts and persistence -----------------------------------------------------


def test_disk_full_evicts_unreferenced_lru_first(make):
    manager = make(device=1, host=1, disk=4)
    put_range(manager, range(6))  # 0..3 on disk, 4 host, 5 device
    manager.retain([key_of(0)])
    put_range(manager, range(6, 8))  # two more spill: evict 1 and 2, never 0
    assert manager.contains(key_of(0)) and not manager.contains(key_of(1)) and not manager.contains(key_of(2))
    assert manager.stats().evictions["disk"] == 2
    check_all(manager, [0, 3, 4, 5, 6, 7])
    check_budgets(manager)


def test_disk_full_with_everything_referenced_refuses_and_loses_nothing(make):
    manager = make(device=1, host=1, disk=2)
    put_range(manager, range(4))
    manager.retain([key_of(i) for i in range(4)])
    with pytest.raises(TierFullError, match="no unreferenced block to evict"):
        manager.put(key_of(4), block_of(4))
    assert not manager.contains(key_of(4))
    check_all(manager, range(4))
    check_budgets(manager)


def test_disk_full_refuse_mode(make):
    manager = make(device=1, host=1, disk=2, tiers={"disk_full": "refuse"})
    put_range(manager, range(4))
    with pytest.raises(TierFullError, match='disk_full = "refuse"'):
        manager.put(key_of(4), block_of(4))
    check_all(manager, range(4))


def test_release_without_persist_deletes_spilled_copies(make):
    manager = make(device=1, host=1, disk=8)
    put_range(manager, range(4))
    keys = [key_of(i) for i in range(4)]
    manager.retain(keys)
    manager.retain(keys[:1])
    manager.release(keys)
    assert manager.contains(key_of(0))  # still referenced once
    assert not manager.contains(key_of(1)) and manager.stats().tiers["disk"].blocks == 1
    assert manager.where(key_of(3)) == {"device"}  # copies above the disk stay as cache
    with pytest.raises(ValueError, match="is retained 0 times, released 1"):
        manager.release(keys[3:4])
    manager.retain(keys[3:4])
    with pytest.raises(ValueError, match="is retained 1 times, released 2"):
        manager.release([keys[3], keys[3]])


def test_persist_writes_through_and_reopens(make, tmp_path):
    manager = make(device=4, host=4, disk=16, store={"persist": True})
    put_range(manager, range(3))
    manager.flush()
    assert manager.stats().tiers["disk"].blocks == 3
    assert all(manager.where(key_of(i)) == {"device", "disk"} for i in range(3))
    assert manager.stats().moved_bytes["host->disk"] == 3 * NB
    manager.close()
    manager.close()  # idempotent
    with pytest.raises(TierError, match="closed"):
        manager.put(key_of(5), block_of(5))
    reopened = make(device=4, host=4, disk=16, store={"persist": True})
    assert reopened.stats().blocks == 3 and reopened.where(key_of(1)) == {"disk"}
    check_all(reopened, range(3))
    assert torch.equal(reopened.gather([key_of(2)]), blocks_of([2]))


def test_persist_refuses_before_storing_anything(make):
    manager = make(device=4, host=4, disk=2, store={"persist": True}, tiers={"disk_full": "refuse"})
    put_range(manager, range(2))
    with pytest.raises(TierFullError, match="disk tier full"):
        manager.put(key_of(2), block_of(2))
    assert not manager.contains(key_of(2))


def test_without_persist_nothing_is_written_until_a_spill(make, tmp_path):
    manager = make(device=2, host=2)
    put_range(manager, range(4))
    manager.flush()
    assert manager.stats().tiers["disk"].blocks == 0 and not (tmp_path / "store").exists()


def test_delete_removes_every_copy(make, tmp_path):
    manager = make(device=1, host=1, disk=8, store={"persist": True})
    put_range(manager, range(4))
    manager.delete([key_of(0), key_of(3), key_of(77)])
    assert not manager.contains(key_of(0)) and not manager.contains(key_of(3))
    with pytest.raises(BlockNotFoundError):
        manager.read(key_of(3))
    manager.close()
    with DiskTier(tmp_path / "store", LAYOUT, 8 * REC) as disk:
        assert sorted(disk.keys()) == [key_of(1), key_of(2)]


def test_score_policy_keeps_high_scoring_blocks(make):
    manager = make(device=3, host=8, tiers={"policy": "score"})
    put_range(manager, range(3))
    manager.note_scores([key_of(0), key_of(1), key_of(2)], torch.tensor([5.0, 0.1, 0.2]))
    put_range(manager, range(3, 5))  # two evictions: the low scores go, the oldest (0) stays
    assert "device" in manager.where(key_of(0))
    assert "device" not in manager.where(key_of(1)) and "device" not in manager.where(key_of(2))
    with pytest.raises(ValueError, match="2 keys but 1 scores"):
        manager.note_scores([key_of(0), key_of(1)], torch.tensor([1.0]))


def test_stats_accounting_through_a_round_trip(make):
    manager = make(device=1, host=1, disk=8)
    put_range(manager, range(3))  # one batch: 0 -> disk, 1 -> host (and a disk copy: the host overflowed), 2 -> device
    assert manager.stats().moved_bytes["host->disk"] == 2 * NB
    # 1 is dropped from the host (it has a disk copy), 2 moves to the host and gets a disk copy,
    # 0 comes up through the host (2 dropped for it: it has its copy now)
    manager.gather([key_of(0)])
    stats = manager.stats()
    assert stats.moved_bytes == {"host->device": NB, "device->host": NB, "disk->host": NB, "host->disk": 3 * NB}
    assert manager.where(key_of(0)) == {"device", "host", "disk"} and manager.where(key_of(2)) == {"disk"}
    assert stats.tiers["device"].used_bytes == NB and stats.tiers["device"].capacity_bytes == NB
    assert stats.tiers["disk"].used_bytes == stats.tiers["disk"].blocks * REC
    assert stats.blocks == 3


# -- concurrency --------------------------------------------------------------------------------


def test_promoting_threads_and_gathering_main_thread(make):
    manager = make(device=8, host=6, disk=64)
    n = 30
    put_range(manager, range(n))
    stop, errors = threading.Event(), []

    def promoter(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                manager.promote([key_of(i) for i in rng.sample(range(n), 4)], to=rng.choice(["host", "device"]))
        except BaseException as error:  # noqa: BLE001 - surfaced below
            errors.append(error)

    threads = [threading.Thread(target=promoter, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    rng, report = random.Random(1), GatherReport()
    try:
        for _ in range(400):
            picks = rng.sample(range(n), 5)
            assert torch.equal(manager.gather([key_of(i) for i in picks], report=report), blocks_of(picks))
            check_budgets(manager)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert report.resident + report.waited + report.fetched == 400 * 5
    check_all(manager, range(n))


def test_delete_and_demote_concurrent_with_promote(make):
    manager = make(device=4, host=4, disk=64)
    put_range(manager, range(20))
    stop, errors = threading.Event(), []

    def promoter() -> None:
        rng = random.Random(3)
        try:
            while not stop.is_set():
                manager.promote([key_of(i) for i in rng.sample(range(40), 6)])
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    thread = threading.Thread(target=promoter)
    thread.start()
    try:
        for i in range(20):
            manager.demote([key_of(i)], to="disk" if i % 2 else "host")
            if i % 3 == 0:
                manager.delete([key_of(i)])
            manager.put(key_of(20 + i), block_of(20 + i))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors
    alive = [i for i in range(40) if i >= 20 or i % 3]
    check_all(manager, alive)
    assert manager.stats().blocks == len(alive)


# -- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_side_stream_promotion_and_gather(tmp_path):
    config = Config(tiers={"device": 4 * NB, "host": 8 * NB, "disk": 32 * REC, "path": str(tmp_path / "s")})
    with TierManager(config, LAYOUT, device="cuda") as manager:
        assert manager.host_pool.pin_memory and manager.copies.stream is not None
        put_range(manager, range(10))
        manager.promote([key_of(0), key_of(1)])
        entry = manager._entries[key_of(0).digest]
        assert isinstance(entry.event, torch.cuda.Event)  # the copy ran on the side stream
        out = manager.gather([key_of(0), key_of(1), key_of(9)])
        assert out.device.type == "cuda"
        assert torch.equal(out.cpu(), blocks_of([0, 1, 9]))
        check_all(manager, range(10))


def test_write_back_gives_dirty_device_blocks_a_host_copy_so_eviction_is_a_drop(make):
    manager = make(device=4, host=8, disk=16)
    put_range(manager, range(4))  # on the device only: evicting them means copying them down
    assert all(manager.where(key_of(i)) == frozenset({"device"}) for i in range(4))
    assert manager.write_back(2) == 2  # the two least recently used
    assert [sorted(manager.where(key_of(i))) for i in range(4)] == [["device", "host"]] * 2 + [["device"]] * 2
    assert manager.stats().moved_bytes["device->host"] == 2 * NB
    assert manager.write_back(2, scan=2) == 0  # the next victims are clean now; nothing looked at beyond them
    check_all(manager, range(4))
    put_range(manager, range(4, 6))  # evicts blocks 0 and 1: drops, no copy down
    assert manager.stats().moved_bytes["device->host"] == 2 * NB
    assert [sorted(manager.where(key_of(i))) for i in range(2)] == [["host"]] * 2
    assert manager.write_back(8) == 4  # 2 .. 5: every evictable device block is clean now
    assert all("host" in manager.where(key_of(i)) for i in range(6))
    check_all(manager, range(6))
    check_budgets(manager)


def test_missing_from_device_is_a_lock_free_hint(make):
    manager = make(device=2, host=8, disk=16)
    put_range(manager, range(4))
    keys = [key_of(i) for i in range(4)]
    assert manager.missing_from_device(keys) == keys[:2]
    assert manager.missing_from_device([]) == []


def test_gather_of_resident_blocks_reports_no_stall_even_when_the_lock_is_contended(make):
    manager = make(device=4, host=8, disk=16)
    put_range(manager, range(4))
    report = GatherReport()
    release = threading.Event()

    def hold_the_lock():
        with manager._cond:
            release.wait(1.0)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    threading.Timer(0.05, release.set).start()
    out = manager.gather([key_of(i) for i in range(4)], report=report)  # waits for the lock: not a stall
    holder.join()
    assert torch.equal(out, blocks_of(range(4)))
    assert (report.resident, report.fetched, report.stall_s) == (4, 0, 0.0)


def test_write_back_never_spills_the_host_to_disk(make):
    manager = make(device=4, host=2, disk=16)
    put_range(manager, range(6))  # 0 and 1 moved down to the host, which is now full
    assert [sorted(manager.where(key_of(i))) for i in range(2)] == [["host"]] * 2
    disk_before = manager.stats().moved_bytes.get("host->disk", 0)
    assert manager.write_back(4) == 0  # the host has no free or droppable slot
    assert manager.stats().moved_bytes.get("host->disk", 0) == disk_before
    check_all(manager, range(6))
    check_budgets(manager)


def test_clean_host_gives_host_only_blocks_a_disk_copy_so_a_gather_keeps_its_disk_reads(make):
    manager = make(device=2, host=4, disk=32)
    put_range(manager, range(6))  # host: 0 .. 3 (their only copies: the host has not overflowed); device: 4, 5
    manager.put(key_of(6), block_of(6))  # device victim 4 comes down: the host overflows (0 spills), 4 gets a copy
    manager.flush()
    where = {i: sorted(manager.where(key_of(i))) for i in range(7)}
    assert [i for i in range(7) if where[i] == ["host"]] == [1, 2, 3]
    assert where[0] == ["disk"] and where[4] == ["disk", "host"]
    assert manager.clean_host(2) == 2  # the two least recently used without a disk copy: 1, 2
    manager.flush()
    assert [sorted(manager.where(key_of(i))) for i in range(1, 5)] == [["disk", "host"]] * 2 + [["host"]] + [["disk", "host"]]
    assert manager.clean_host(2, scan=2) == 0  # the next victims are clean now; nothing looked at beyond them
    # A disk read needs a host slot: a clean host block is dropped for it, so the host caches the read
    # (making device room for it moved device-only block 5 down, which dropped clean block 1).
    manager.gather([key_of(0)])
    assert sorted(manager.where(key_of(0))) == ["device", "disk", "host"]
    assert sorted(manager.where(key_of(5))) == ["disk", "host"]
    check_all(manager, range(7))
    check_budgets(manager)


def test_blocks_entering_an_overflowed_host_get_no_copy_beyond_the_records_spills_need(make):
    manager = make(device=2, host=2, disk=6)
    put_range(manager, range(6))  # disk: 0, 1; host: 2, 3; device: 4, 5; the 4 records left are those 2 .. 5 could spill into
    assert [sorted(manager.where(key_of(i))) for i in (2, 3)] == [["host"]] * 2  # so the host overflowed, yet no copies
    put_range(manager, range(6, 8))  # 4, 5 come down; 2, 3 spill: the disk is exactly full, nothing lost
    assert manager.stats().tiers["disk"].blocks == 4
    check_all(manager, range(8))
    check_budgets(manager)


def test_clean_host_leaves_the_disk_records_a_spill_needs(make):
    manager = make(device=2, host=2, disk=8)
    put_range(manager, range(8))  # disk: 0 .. 3; host: 4, 5 (only copies); 4 records left = host + device slots
    used = manager.stats().tiers["disk"].blocks
    assert manager.clean_host(2) == 0  # a copy now could take the room a later spill needs; nothing evicted either
    assert manager.stats().tiers["disk"].blocks == used
    assert [sorted(manager.where(key_of(i))) for i in (4, 5)] == [["host"]] * 2
    put_range(manager, range(8, 12))  # every block above can still spill: the disk is exactly full
    assert manager.stats().tiers["disk"].blocks == 8
    check_all(manager, range(12))


def test_a_disk_write_failure_while_making_room_returns_the_reserved_slots(make, monkeypatch):
    manager = make(device=2, host=1, disk=8)
    put_range(manager, range(3))  # device: 1, 2; host: 0
    manager.delete([key_of(1)])  # one device slot free
    disk = manager._open_disk()

    def failing_put_many(keys, blocks):
        raise TierError("disk write failed")

    monkeypatch.setattr(disk, "put_many", failing_put_many)
    used = {name: usage.used_bytes for name, usage in manager.stats().tiers.items()}
    with pytest.raises(TierError, match="disk write failed"):
        put_range(manager, [5, 6])  # one free device slot reserved, then the spill host -> disk fails
    assert {name: usage.used_bytes for name, usage in manager.stats().tiers.items()} == used
    assert not manager.contains(key_of(5)) and not manager.contains(key_of(6))
    monkeypatch.undo()
    put_range(manager, [5, 6])
    check_all(manager, [0, 2, 5, 6])
    check_budgets(manager)


def test_release_waits_for_a_gather_holding_the_block(make):
    manager = make(device=1, host=1, disk=8)
    put_range(manager, range(3))  # block 0 is on disk only
    manager.retain([key_of(0)])
    entry = manager._entries[key_of(0).digest]
    with manager._cond:
        entry.holds += 1  # as a gather does while it fetches the block
    releaser = threading.Thread(target=manager.release, args=([key_of(0)],))
    releaser.start()
    releaser.join(0.3)
    assert releaser.is_alive() and manager.contains(key_of(0))  # not deleted under the gather
    with manager._cond:
        entry.holds -= 1
        manager._cond.notify_all()
    releaser.join(5)
    assert not releaser.is_alive()
    assert not manager.contains(key_of(0))


def test_write_through_futures_that_landed_are_pruned_and_failures_still_reported(make, monkeypatch):
    from concurrent.futures import Future

    manager = make(device=4, host=4, disk=64, store={"persist": True})
    disk = manager._open_disk()
    for i in range(20):
        manager.put(key_of(i), block_of(i))
        disk.flush()  # the write-through has landed
    assert len(manager._pending) <= 1  # not one entry per put until flush()
    real = disk.submit_put_many

    def failing_submit(keys, blocks):
        future: Future = Future()
        future.set_exception(TierError("write-through failed"))
        return future

    monkeypatch.setattr(disk, "submit_put_many", failing_submit)
    manager.put(key_of(30), block_of(30))
    monkeypatch.setattr(disk, "submit_put_many", real)
    for i in range(31, 34):
        manager.put(key_of(i), block_of(i))
        disk.flush()
    with pytest.raises(TierError, match="write-through failed"):
        manager.flush()
    assert manager.where(key_of(30)) == {"device"}  # un-marked: it never reached the disk
    assert manager.stats().tiers["disk"].blocks == 23
    manager.flush()
    assert manager._pending == []

