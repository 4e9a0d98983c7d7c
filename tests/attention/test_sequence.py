"""SequenceKV over the real TierManager: exact mode equals causal sdpa with blocks spread over
device, host and disk; sparse selection; pinned sink/local; device budget; block identity."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hkv.tiers.manager as tier_manager
from hkv.blocks import BlockLayout
from hkv.config import ConfigError

from helpers.sequences import HKV, HQ, LAYERS, D, Driver, make_config, open_sequence, opened_sequence, reference


@pytest.mark.parametrize("appends,chunk", [([13], 8), ([13], 3), ([5, 7, 1, 1, 1, 2, 9], 4), ([32, 1, 1, 1], 64), ([1] * 20, 8)])
def test_exact_mode_equals_sdpa_with_blocks_in_every_tier(open_seq, tmp_path, appends: list[int], chunk: int) -> None:
    config = make_config(tmp_path, chunk=chunk)
    manager, seq = open_seq(config)
    driver = Driver(seq, manager)
    for n in appends:
        driver.check_exact(driver.step(n))
    assert seq.seq_length() == sum(appends)
    placed = {name for layer in range(LAYERS) for key in seq.block_keys(layer) for name in manager.where(key)}
    if sum(appends) >= 32:
        assert "host" in placed and "disk" in placed, placed


def test_decode_appends_write_into_one_window(open_seq, tmp_path) -> None:
    """Appends that end within one block of the last boundary (decode steps) write into the layer's
    preallocated window instead of concatenating: the same tensor across boundaries and after a
    longer append, and the fresh window (``tail_kv``) and exact attention stay what they were."""
    config = make_config(tmp_path)  # 4-token blocks
    manager, seq = open_seq(config)
    driver = Driver(seq, manager, seed=4)
    windows = None
    for n in (6, 1, 1, 1, 1, 1, 7, 1, 2, 1, 1, 2, 1):
        before = seq.seq_length()
        driver.check_exact(driver.step(n))
        total = seq.seq_length()
        start = total - total % 4
        tail = seq.tail_kv()
        if total > start:
            for layer in range(LAYERS):
                assert torch.equal(tail[layer, 0], driver.keys[layer][:, start:]) and torch.equal(tail[layer, 1], driver.values[layer][:, start:])
        if total - (before - before % 4) <= 4:  # within one block of the last boundary: in the window
            assert all(kv is not None for kv in seq._fresh_kv)
            if windows is not None:
                assert all(w is w0 for w, w0 in zip(seq._windows, windows))
            windows = list(seq._windows)
        else:  # more than the 4-token window holds: concatenated
            assert all(kv is None for kv in seq._fresh_kv)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_exact_mode_long_prefill_waves_exceed_device(open_seq, tmp_path, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Far more blocks than the device holds: exact attention reads them in waves, in pieces of 5 blocks."""
    import hkv.attention.sequence

    monkeypatch.setattr(hkv.attention.sequence, "PIECE_KV_ELEMENTS", 5 * 2 * HKV * 4 * D)
    config = make_config(tmp_path, chunk=16, host_blocks=4)
    manager, seq = open_seq(config, device=device)
    driver = Driver(seq, manager, seed=1)
    for n in (70, 45, 1, 1, 3):
        driver.check_exact(driver.step(n))
    assert len(seq.block_keys(0)) * manager.layout.nbytes * LAYERS > manager.stats().tiers["device"].capacity_bytes * 4


@pytest.mark.parametrize("storage,tol", [("float16", 5e-3), ("bfloat16", 4e-2)])
def test_low_precision_storage(open_seq, tmp_path, storage: str, tol: float) -> None:
    config = make_config(tmp_path, dtype=storage)
    manager, seq = open_seq(config, dtype=torch.float32)
    driver = Driver(seq, manager, seed=2)
    for n in (11, 1, 6):
        driver.check_exact(driver.step(n), atol=tol)


def test_half_precision_model(open_seq, tmp_path) -> None:
    config = make_config(tmp_path)
    manager, seq = open_seq(config, dtype=torch.float16)
    driver = Driver(seq, manager, seed=3, dtype=torch.float16)
    for n in (9, 1, 1):
        driver.check_exact(driver.step(n), atol=5e-3)


def _planting(hot_block: int, block: int):
    """Keys of ``hot_block`` of every layer get one key aligned with every later query."""
    direction = torch.zeros(D)
    direction[0] = 1.0

    def hook(layer: int, start: int, k: torch.Tensor, q: torch.Tensor):
        k = k * 0.1
        q = q * 0.1 + direction * 4
        pos = hot_block * block + 1 - start
        if 0 <= pos < k.shape[1]:
            k[:, pos] = direction * 6
        return k, q

    return {"hook": hook}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sparse_reads_sink_local_and_planted_block(open_seq, tmp_path, device: str) -> None:
    block, total = 4, 60
    config = make_config(tmp_path, mode="sparse", block=block, sink=4, local=8, budget=16, device_blocks=12)
    manager, seq = open_seq(config, device=device)
    driver = Driver(seq, manager, seed=4)
    planted = _planting(hot_block=6, block=block)
    driver.step(total - 1, planted=planted)
    results = driver.step(1, planted=planted)  # decode: 15 sealed blocks, past = blocks 0..14
    for layer, (out, q) in enumerate(results):
        n = driver.keys[layer].shape[1]
        # expected read: sink block 0, top-1 = planted block 6, local: block 13 and the fresh block 14
        allowed = torch.zeros(n, dtype=torch.bool)
        for b in (0, 6, 13, 14):
            allowed[b * block : (b + 1) * block] = True
        allowed[60:] = True
        expected = reference(q, driver.keys[layer], driver.values[layer], D**-0.5, mask=allowed[None])
        torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=2e-5)
        for b in (0, 13, 14):  # sink and local blocks are pinned on the device
            assert "device" in manager.where(seq.block_keys(layer)[b])


def test_sparse_budget_respected_over_many_steps(open_seq, tmp_path) -> None:
    config = make_config(tmp_path, mode="sparse", block=4, sink=4, local=4, budget=12, chunk=8, device_blocks=7, host_blocks=4)
    manager, seq = open_seq(config)
    driver = Driver(seq, manager, seed=5)
    driver.step(40)
    for _ in range(12):
        for out, _q in driver.step(1):
            assert torch.isfinite(out).all()
    capacity = manager.stats().tiers["device"].capacity_bytes
    assert 0 < driver.device_peak <= capacity
    stats = seq.stats()
    assert stats.step == 13 and stats.tokens == 52 and stats.needed > 0
    assert 0 < stats.select_s < stats.attend_s  # choosing blocks is timed, as a part of attention
    assert 0 < stats.last.select_s < stats.last.attend_s


def test_block_keys_follow_token_ids(open_seq, tmp_path) -> None:
    config = make_config(tmp_path, device_blocks=4 * LAYERS * 2 + 2)
    manager, first = open_seq(config)
    _, second = open_seq(config, manager=manager)
    _, other_model = open_seq(config, manager=manager, fingerprint=b"other-model")
    _, anonymous = open_seq(config, manager=manager)
    ids = torch.arange(10)
    kv = torch.randn(HKV, 10, D)
    for seq in (first, second, other_model):
        seq.note_tokens(ids)
    for seq in (first, second, other_model, anonymous):  # anonymous never notes tokens: nonce chain
        for layer in range(LAYERS):
            seq.append(layer, kv, kv)
    assert first.block_keys(0) == second.block_keys(0) and len(first.block_keys(0)) == 2
    assert first.block_keys(0) != first.block_keys(1)
    assert set(first.block_keys(0)).isdisjoint(other_model.block_keys(0))
    assert set(first.block_keys(0)).isdisjoint(anonymous.block_keys(0))


def test_errors_and_close(open_seq, tmp_path) -> None:
    config = make_config(tmp_path)
    manager, seq = open_seq(config)
    seq.note_tokens(torch.arange(3))
    with pytest.raises(ValueError, match="note_tokens covered only 3"):
        seq.append(0, torch.randn(HKV, 5, D), torch.randn(HKV, 5, D))
    with pytest.raises(ValueError, match="append expects"):
        seq.append(0, torch.randn(HKV, 5, D + 1), torch.randn(HKV, 5, D + 1))
    with pytest.raises(ValueError, match="append their KV first"):
        seq.attend(1, torch.randn(HQ, 2, D), 1.0)
    capacity = manager.gather_capacity()
    seq.note_tokens(torch.arange(20))
    for layer in range(LAYERS):
        seq.append(layer, torch.randn(HKV, 20, D), torch.randn(HKV, 20, D))
    assert manager.gather_capacity() < capacity  # sink + local pinned
    seq.close()
    seq.close()
    assert manager.gather_capacity() == capacity
    with pytest.raises(RuntimeError, match="closed"):
        seq.attend(0, torch.randn(HQ, 1, D), 1.0)


def test_device_too_small_for_pinned_blocks(open_seq, tmp_path) -> None:
    config = make_config(tmp_path, device_blocks=LAYERS * 2)
    with pytest.raises(ConfigError, match="pinned sink"):
        open_seq(config)


def test_layout_must_match(tmp_path) -> None:
    config = make_config(tmp_path)
    with tier_manager.TierManager(config, BlockLayout(HKV, 4, D, torch.float16), device="cpu") as manager:
        with pytest.raises(ValueError, match="does not match"):
            open_sequence(config, manager=manager, dtype=torch.float32)


@settings(max_examples=12, deadline=None)
@given(
    appends=st.lists(st.integers(1, 19), min_size=1, max_size=6),
    chunk=st.sampled_from([1, 3, 8, 32]),
    mode=st.sampled_from(["exact", "sparse"]),
    seed=st.integers(0, 2**16),
)
def test_any_appends_stay_within_budget_and_exact_mode_matches(appends: list[int], chunk: int, mode: str, seed: int) -> None:
    """Property: for any append sizes and query chunk size, the device tier stays within budget,
    outputs are finite, and exact mode equals causal sdpa."""
    with tempfile.TemporaryDirectory() as folder:
        config = make_config(Path(folder), mode=mode, chunk=chunk, budget=12, host_blocks=3)
        with opened_sequence(config) as (manager, seq):
            driver = Driver(seq, manager, seed=seed)
            for n in appends:
                results = driver.step(n)
                assert all(bool(torch.isfinite(out).all()) for out, _ in results)
                if mode == "exact":
                    driver.check_exact(results)
