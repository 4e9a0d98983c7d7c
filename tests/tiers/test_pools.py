"""Slot pools (device and host tiers) and slot copies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hkv.tiers.host as host_module
from hkv.blocks import BlockKey, BlockLayout
from hkv.errors import BlockNotFoundError, TierFullError
from hkv.tiers.device import DeviceTier, resolve_device
from hkv.tiers.host import HostMemoryError, HostTier
from hkv.tiers.pool import copy_slots, runs

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
NB = LAYOUT.nbytes


def key_of(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def blocks_of(*indices: int) -> torch.Tensor:
    return torch.stack([torch.randn(LAYOUT.shape, generator=torch.Generator().manual_seed(i)).to(LAYOUT.dtype) for i in indices])


@pytest.mark.parametrize("make", [lambda cap: DeviceTier(LAYOUT, cap, "cpu"), lambda cap: HostTier(LAYOUT, cap)])
def test_a_pool_first_used_in_inference_mode_is_written_outside_it(make):
    """The pools are first touched inside a model's forward (torch.inference_mode); the
    prefetcher's threads write them outside it. An inference tensor would refuse those writes
    (a worker's device -> host move then failed and leaked the host slots it had reserved)."""
    pool = make(2 * NB)
    with torch.inference_mode():
        pool.put(key_of(0), blocks_of(0)[0])
    assert not pool.data.is_inference()
    pool.data[1].copy_(blocks_of(1)[0])  # outside inference mode, as a prefetch worker does
    assert torch.equal(pool.data[1], blocks_of(1)[0])


@pytest.mark.parametrize("make", [lambda cap: DeviceTier(LAYOUT, cap, "cpu"), lambda cap: HostTier(LAYOUT, cap)])
def test_pool_round_trip_budget_and_slots(make):
    pool = make(3 * NB + NB // 2)  # 3.5 blocks of budget: 3 slots, never over
    assert pool.n_slots == 3 and pool.capacity_blocks == 3
    assert not pool.allocated  # lazily allocated
    data = blocks_of(0, 1, 2, 3)
    pool.put_many([key_of(0), key_of(1)], data[:2])
    pool.put(key_of(2), data[2])
    assert pool.allocated and pool.used_bytes() == 3 * NB <= pool.capacity_bytes
    assert [pool.slot(key_of(i)) for i in range(3)] == [0, 1, 2]  # lowest slot first
    for i in range(3):
        out = torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype)
        pool.get_into(key_of(i), out)
        assert torch.equal(out, data[i])
    with pytest.raises(TierFullError, match="1 new blocks do not fit: 0 of 3 slots free"):
        pool.put(key_of(3), data[3])
    assert not pool.contains(key_of(3)) and len(pool) == 3
    pool.put(key_of(1), data[3])  # a known key is overwritten in place
    assert torch.equal(pool.view(key_of(1)), data[3])
    out = torch.empty((2, *LAYOUT.shape), dtype=LAYOUT.dtype)
    pool.get_many_into([key_of(2), key_of(0)], out)
    assert torch.equal(out, data[[2, 0]])
    assert pool.delete(key_of(0)) and not pool.delete(key_of(0))
    with pytest.raises(BlockNotFoundError, match="not found"):
        pool.view(key_of(0))
    pool.put(key_of(5), data[0])
    assert pool.slot(key_of(5)) == 0  # the freed slot is reused
    assert sorted(pool.keys()) == sorted([key_of(1), key_of(2), key_of(5)])


def test_view_is_zero_copy_and_index_select_gathers():
    pool = DeviceTier(LAYOUT, 4 * NB)
    data = blocks_of(0, 1, 2)
    pool.put_many([key_of(i) for i in range(3)], data)
    view = pool.view(key_of(1))
    assert view.data_ptr() == pool.data[1].data_ptr()
    gathered = pool.data.index_select(0, pool.index(pool.slots([key_of(2), key_of(0)])))
    assert torch.equal(gathered, data[[2, 0]])


def test_pool_rejects_bad_blocks_and_small_budgets():
    with pytest.raises(ValueError, match="smaller than one block"):
        DeviceTier(LAYOUT, NB - 1)
    pool = DeviceTier(LAYOUT, 2 * NB)
    with pytest.raises(ValueError, match=r"expected \[1, 2, 2, 4, 8\] torch.float16"):
        pool.put(key_of(0), torch.zeros(LAYOUT.shape, dtype=torch.float32))


def test_reserve_assign_unreserve_count_against_budget():
    pool = DeviceTier(LAYOUT, 2 * NB)
    slot = pool.alloc()
    assert pool.used_bytes() == NB and pool.free_slots() == 1
    pool.unreserve(slot)
    assert pool.used_bytes() == 0 and pool.free_slots() == 2
    pool.assign(key_of(7), pool.alloc())
    with pytest.raises(ValueError, match="already has slot"):
        pool.assign(key_of(7), pool.alloc())


def test_host_tier_checks_free_ram_with_figures(monkeypatch):
    monkeypatch.setattr(host_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=10 * NB))
    with pytest.raises(HostMemoryError, match=rf"tiers.host = {20 * NB} bytes .* only {10 * NB} bytes"):
        HostTier(LAYOUT, 20 * NB)
    assert HostTier(LAYOUT, 5 * NB).n_slots == 5


def test_host_tier_unpinned_without_cuda():
    pool = HostTier(LAYOUT, 2 * NB)
    assert pool.pin_memory == torch.cuda.is_available()
    assert pool.device.type == "cpu"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="tiers.accelerator = 'cuda'"):
            resolve_device("cuda")


def test_runs_coalesce_consecutive_slots():
    assert runs([0, 1, 2, 5, 6], [3, 4, 5, 0, 9]) == [(0, 3, 3), (5, 0, 1), (6, 9, 1)]
    assert runs([], []) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-2, 3)), min_size=1, max_size=300))
def test_runs_in_python_match_the_batched_path(steps) -> None:
    """Short slot lists are coalesced in plain Python, long ones with tensor ops: the same runs."""
    import hkv.tiers.pool as pool

    dst, src, d, s = [], [], 5, 7
    for jump_d, jump_s in steps:  # 0: the next slot follows on
        d, s = d + 1 + jump_d, max(0, s + 1 + jump_s)
        dst.append(d)
        src.append(s)
    python = runs(dst, src)
    limit = pool._RUNS_IN_PYTHON
    try:
        pool._RUNS_IN_PYTHON = 0
        assert python == runs(dst, src)
    finally:
        pool._RUNS_IN_PYTHON = limit


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_copy_slots_matches_a_loop(data):
    n_src, n_dst = 8, 8
    count = data.draw(st.integers(1, 8))
    src_slots = data.draw(st.lists(st.integers(0, n_src - 1), min_size=count, max_size=count))
    dst_slots = data.draw(st.lists(st.integers(0, n_dst - 1), min_size=count, max_size=count, unique=True))
    src = torch.arange(n_src * 4, dtype=torch.float32).reshape(n_src, 2, 2)
    dst, expected = torch.zeros(n_dst, 2, 2), torch.zeros(n_dst, 2, 2)
    copy_slots(dst, dst_slots, src, src_slots)
    for d, s in zip(dst_slots, src_slots):
        expected[d] = src[s]
    assert torch.equal(dst, expected)


@pytest.mark.cuda
def test_pinned_host_pool_and_cuda_device_pool():
    host = HostTier(LAYOUT, 4 * NB)
    device = DeviceTier(LAYOUT, 4 * NB, "cuda")
    data = blocks_of(0, 1)
    host.put_many([key_of(0), key_of(1)], data)
    assert host.data.is_pinned()
    slots = [device.alloc(), device.alloc()]
    copy_slots(device.data, slots, host.data, host.slots([key_of(0), key_of(1)]), non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(device.data[slots].cpu(), data)
