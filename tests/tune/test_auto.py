"""Budgets without a config (issue 17, part 3: ``hkv demo`` takes its budgets from `hkv tune`'s
logic): rates cached or probed, capacities read now, budgets within what is free on this
machine, an existing store's dtype kept."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

from hkv import Config, ConfigError
from hkv.blocks import BlockLayout
from hkv.store.block_store import BlockStore
from hkv.store.space import free_bytes
from hkv.tune.auto import auto_plan, quick_machine
from hkv.tune.plan import ModelShape
from hkv.tune.rates_cache import cache_key, read_rates, write_rates

SMOLLM2 = ModelShape(layers=30, q_heads=9, kv_heads=3, head_dim=64, dtype=torch.float32, trained_tokens=8192)
LAYOUT = BlockLayout(3, 64, 64, torch.float16)
PROBE = 4 << 20


def test_rates_are_probed_once_then_reused_and_capacities_read_each_time(tmp_path: Path) -> None:
    cache = tmp_path / "rates.json"
    store = tmp_path / "store"
    first, rates, measured = quick_machine(store, LAYOUT, probe_bytes=PROBE, cache=cache)
    assert measured and rates.source == "quick probe" and rates.sample_bytes == PROBE
    assert first.disk_read_gbps > 0 and first.host_to_device_gbps > 0
    key = cache_key("cuda" if torch.cuda.is_available() else "cpu", store, LAYOUT.nbytes)
    assert read_rates(key, path=cache) == rates
    again, cached, measured = quick_machine(store, LAYOUT, probe_bytes=PROBE, cache=cache)
    assert not measured and cached == rates
    assert (again.disk_read_gbps, again.host_to_device_gbps) == (first.disk_read_gbps, first.host_to_device_gbps)
    assert abs(again.host_free_bytes - psutil.virtual_memory().available) < 2 << 30  # read now, not cached
    other, _, measured = quick_machine(store, BlockLayout(3, 64, 64, torch.float32), probe_bytes=PROBE, cache=cache)
    assert measured  # another block size: other rates


def test_stale_or_malformed_cached_rates_are_measured_again(tmp_path: Path) -> None:
    cache = tmp_path / "rates.json"
    store = tmp_path / "store"
    _, rates, _ = quick_machine(store, LAYOUT, probe_bytes=PROBE, cache=cache)
    key = cache_key("cuda" if torch.cuda.is_available() else "cpu", store, LAYOUT.nbytes)
    write_rates(key, replace(rates, measured_at=time.time() - 8 * 24 * 3600), path=cache)
    assert read_rates(key, path=cache) is None
    assert quick_machine(store, LAYOUT, probe_bytes=PROBE, cache=cache)[2]
    for text in ("not json", json.dumps({"entries": {key: {"device_gbps": "fast"}}}), json.dumps([1, 2])):
        cache.write_text(text)
        assert read_rates(key, path=cache) is None
    wrong = {**rates.__class__.__annotations__}  # every field present, each a string: the wrong types
    cache.write_text(json.dumps({"entries": {key: wrong}}))
    assert read_rates(key, path=cache) is None


@pytest.mark.parametrize("context", [4096, 2**17, 2**20])
def test_budgets_never_exceed_free_ram_or_disk_on_this_machine(tmp_path: Path, context: int) -> None:
    auto = auto_plan(SMOLLM2, context, tmp_path / "store", probe_bytes=PROBE, cache=tmp_path / "rates.json")
    tiers, machine = auto.plan.config.tiers, auto.machine
    ram = psutil.virtual_memory().available
    on_gpu = machine.gpu is not None
    device_ram = 0 if on_gpu else int(tiers.device)
    assert device_ram + int(tiers.host) <= ram  # the device tier is RAM too without a GPU
    if on_gpu:
        assert int(tiers.device) <= torch.cuda.mem_get_info()[0]
    assert int(tiers.disk) <= free_bytes(tmp_path)
    assert Config.load(auto.plan.config, env={}) == auto.plan.config  # a config that loads as written
    assert auto.plan.config.tiers.dtype == "float16"  # a float32 model, sparse: fp16 blocks
    assert auto.plan.config.attention.positions == ("remap" if context > 8192 else "original")
    assert auto.plan.config.prefetch.enabled == (on_gpu or machine.cores >= 4)


def test_a_context_this_machine_cannot_hold_is_refused(tmp_path: Path) -> None:
    """2^26 SmolLM2 tokens: 1.4 TiB of fp16 KV and 90 GiB of summaries, beyond any disk or RAM here."""
    with pytest.raises(ConfigError, match=r"\d+ bytes"):
        auto_plan(SMOLLM2, 2**26, tmp_path / "store", probe_bytes=PROBE, cache=tmp_path / "rates.json")


def test_an_existing_store_keeps_its_dtype(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with BlockStore(store, BlockLayout(3, 64, 64, torch.float32), 1 << 24):
        pass
    auto = auto_plan(SMOLLM2, 4096, store, probe_bytes=PROBE, cache=tmp_path / "rates.json")
    assert auto.plan.config.tiers.dtype == "float32"
    assert any("as the existing store" in note for note in auto.plan.notes)
