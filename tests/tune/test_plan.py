"""`hkv tune`'s plan and cost model on machines described by hand (no measurement): budgets
within what is free, the encoding that fits the disk, prefetch by cores, and the prediction's
parts (issue 17, part 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hkv import ConfigError
from hkv.tune.machine import MachineProfile
from hkv.tune.plan import ModelShape, plan, predict_step

GiB = 2**30
SMOLLM2 = ModelShape(layers=30, q_heads=9, kv_heads=3, head_dim=64, dtype=torch.float16)


def machine(**changes) -> MachineProfile:
    fields = dict(cores=2, gpu=None, device_free_bytes=20 * GiB, host_free_bytes=20 * GiB, disk_free_bytes=100 * GiB,
                  device_gbps=5.0, host_to_device_gbps=2.0, disk_read_gbps=0.3, disk_cold=True)  # fmt: skip
    return MachineProfile(**{**fields, **changes})


def test_a_million_tokens_on_a_small_cpu_machine(tmp_path: Path) -> None:
    result = plan(SMOLLM2, 2**20, machine(), store=tmp_path, compute_ms=100.0)
    tiers = result.config.tiers
    assert result.kv_bytes == 30 * 2**14 * 49152  # 22.5 GiB of fp16 blocks
    assert int(tiers.device) + int(tiers.host) <= 20 * GiB * 0.6 and int(tiers.device) >= 30 * 37 * 49152
    assert tiers.disk_encoding == "none" and int(tiers.disk) >= result.kv_bytes and int(tiers.disk) <= 90 * GiB
    assert not result.config.prefetch.enabled and any("prefetch off" in note for note in result.notes)
    step = result.prediction
    assert step.total_ms == pytest.approx(step.compute_ms + step.summaries_ms + step.host_ms + step.disk_ms, abs=0.05)
    assert step.summaries_ms == pytest.approx(720 * 2**20 / 5e9 * 1e3, rel=0.01)  # 1,536 B x 491,520 blocks
    assert sum(step.blocks.values()) == pytest.approx(30 * 32, abs=0.2)  # budget_tokens / block_tokens per layer


def test_a_small_disk_gets_an_encoding_and_exact_mode_an_error(tmp_path: Path) -> None:
    for free, expected in ((30 * GiB, "none"), (16 * GiB, "int8"), (8 * GiB, "int4")):
        result = plan(SMOLLM2, 2**20, machine(disk_free_bytes=free), store=tmp_path, compute_ms=100.0)
        assert result.config.tiers.disk_encoding == expected and int(result.config.tiers.disk) <= 0.9 * free
    with pytest.raises(ConfigError, match="need .* bytes on disk even as none"):
        plan(SMOLLM2, 2**20, machine(disk_free_bytes=16 * GiB), store=tmp_path, compute_ms=100.0, mode="exact")
    with pytest.raises(ConfigError, match="need .* bytes on disk even as int4"):
        plan(SMOLLM2, 2**20, machine(disk_free_bytes=4 * GiB), store=tmp_path, compute_ms=100.0)


def test_prefetch_and_overlap_with_a_gpu(tmp_path: Path) -> None:
    gpu = machine(cores=16, gpu="H200", device_free_bytes=100 * GiB, host_free_bytes=100 * GiB, device_gbps=3000.0,
                  host_to_device_gbps=20.0)  # fmt: skip
    result = plan(SMOLLM2, 2**20, gpu, store=tmp_path, compute_ms=5.0)
    assert result.config.prefetch.enabled and result.config.prefetch.workers == 4
    assert int(result.config.tiers.device) == result.kv_bytes  # it all fits in half the HBM
    step = result.prediction
    assert step.host_ms == 0 and step.disk_ms == 0 and step.bound == "compute"
    assert step.total_ms == pytest.approx(step.summaries_ms + max(step.compute_ms, step.host_ms + step.disk_ms), abs=0.05)


def test_a_slow_disk_bounds_the_step_and_a_config_can_be_predicted(tmp_path: Path) -> None:
    small = machine(host_free_bytes=4 * GiB, device_free_bytes=4 * GiB, disk_read_gbps=0.1)
    result = plan(SMOLLM2, 2**20, small, store=tmp_path, compute_ms=50.0)
    assert result.prediction.bound == "disk" and result.prediction.blocks["disk"] > result.prediction.blocks["host"]
    again = predict_step(result.config, SMOLLM2, 2**20, small, 50.0)
    assert again == result.prediction


def test_host_blocks_cost_nothing_where_a_cpu_reads_them_in_place(tmp_path: Path) -> None:
    """Without a GPU a raw host tier is read in place while no block is on disk; an encoded host,
    or a layer with blocks on disk, still pays the host's copies."""
    from hkv.config import Config

    kv = 30 * 2**11 * 49152  # 128K tokens of fp16 blocks
    config = Config.load(env={}, tiers={"device": 64 * 2**20, "host": 2 * kv, "dtype": "float16"})
    in_ram = predict_step(config, SMOLLM2, 2**17, machine(), 50.0)
    assert in_ram.blocks["host"] > 0 and in_ram.host_ms == 0 and in_ram.total_ms == pytest.approx(50.0 + in_ram.summaries_ms, abs=0.05)
    encoded = predict_step(Config.load(config, env={}, tiers={"host_encoding": "int8"}), SMOLLM2, 2**17, machine(), 50.0)
    assert encoded.host_ms > 0
    spilling = predict_step(Config.load(config, env={}, tiers={"host": kv // 2}), SMOLLM2, 2**17, machine(), 50.0)
    assert spilling.blocks["disk"] > 0 and spilling.host_ms > 0
    assert predict_step(config, SMOLLM2, 2**17, machine(gpu="H200"), 50.0).host_ms > 0


def test_shape_parsing() -> None:
    assert ModelShape.parse("layers=30,q_heads=9,kv_heads=3,head_dim=64") == ModelShape(30, 9, 3, 64, torch.float16)
    for bad, words in (("layers=30,q_heads=9", "lacks head_dim, kv_heads"), ("layers=0,q_heads=1,kv_heads=1,head_dim=8", "'layers=0'"),
                       ("layers=2,q_heads=1,kv_heads=1,head_dim=8,dtype=int8", "dtype = 'int8'")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            ModelShape.parse(bad)


def test_a_context_beyond_the_trained_length_is_remapped(tmp_path: Path) -> None:
    trained = ModelShape(30, 9, 3, 64, torch.float16, trained_tokens=8192)
    assert plan(trained, 8192, machine(), store=tmp_path, compute_ms=10.0).config.attention.positions == "original"
    long = plan(trained, 8193, machine(), store=tmp_path, compute_ms=10.0)
    assert long.config.attention.positions == "remap" and any("beyond the model's trained 8192" in note for note in long.notes)
    assert plan(trained, 2**20, machine(), store=tmp_path, compute_ms=10.0, mode="exact").config.attention.positions == "original"
    assert plan(SMOLLM2, 2**20, machine(), store=tmp_path, compute_ms=10.0).config.attention.positions == "original"  # unknown length
    assert ModelShape.parse("layers=30,q_heads=9,kv_heads=3,head_dim=64,trained_tokens=8192") == trained
