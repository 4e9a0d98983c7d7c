"""`hkv bench decode`'s options and figures on tiny sizes: correctness only, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hkv.bench.decode as decode_module
from hkv.bench.decode import run_disk_bound_bench, BENCH_TIERS, GiB, bench_options, run_decode_bench
from hkv.config import Config

KIB = 1024


@pytest.fixture
def decode_model(tiny_lm) -> torch.nn.Module:
    """2 layers x 1 KV head x 16 dims: tiny blocks, so a short context already spills to disk."""
    return tiny_lm("llama", sharpen=None, vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)


def test_options_default_unchanged_and_million_preset() -> None:
    plain = bench_options(None)
    assert plain == {"config": None, "contexts": (8192, 32768, 131072), "baseline_max_bytes": None, "isolate": False}
    million = bench_options(None, preset="million")
    tiers = million["config"].tiers
    assert million["contexts"] == (8192, 524288, 1048576) and million["isolate"] is True
    assert (int(tiers.device), int(tiers.host), tiers.dtype) == (GiB, 4 * GiB, "float16")
    assert int(tiers.disk) == int(Config.load(tiers=BENCH_TIERS).tiers.disk)
    assert million["baseline_max_bytes"] == 8 * GiB
    mine = bench_options(None, preset="million", contexts=(4096,), host_budget="2GiB", isolate=False)
    assert mine["contexts"] == (4096,) and int(mine["config"].tiers.host) == 2 * GiB and mine["isolate"] is False
    with pytest.raises(ValueError, match="preset"):
        bench_options(None, preset="billion")


def test_tiny_run_spills_to_disk_and_reports_memory(decode_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_store = tmp_path.parent / f"{tmp_path.name}-user-store"
    monkeypatch.setenv("HKV_TIERS__PATH", str(user_store))  # must not redirect the benchmark's temporary store
    # 2 layers x 1 KV head x 64 tokens x 16 dims x fp16 x (K, V) = 4 KiB per block; 2,048 tokens
    # are 64 blocks (256 KiB): 64 KiB on the device, 64 KiB on the host, the rest must go to disk.
    # DynamicCache (fp32 KV: 256 KiB at 1,024 tokens, 512 KiB at 2,048) runs only at 1,024.
    config = Config.load(tiers={"device": 64 * KIB, "host": 64 * KIB, "disk": 64 * KIB, "dtype": "float16"})
    figures = run_decode_bench(config, contexts=(1024, 2048), steps=1, model=decode_model, weights="random", device="cpu",
                               baseline_max_bytes=300 * KIB, store_dir=tmp_path)
    json.dumps(figures)  # what --json writes
    for key in ("hkv_ms", "baseline_ms", "stall_frac", "hit_rate", "hkv_fill_s", "tier_bytes", "kv_bytes",
                "rss_peak_bytes", "rss_lifetime_peak_bytes", "rss_limit_bytes", "baseline_skipped", "rss_within_limit",
                "host_ms_per_layer", "layer_ms"):
        assert key in figures, key
    for host, parts in zip(figures["host_ms_per_layer"], figures["layer_ms"]):  # hkv's own time per layer, measured
        assert 0 <= host <= parts["attend"] + parts["append"] and parts["kernel"] > 0
    assert figures["kv_bytes"] == [2 * 2 * 16 * 2 * n for n in (1024, 2048)]
    for tiers, kv in zip(figures["tiers_after_fill"], figures["kv_bytes"]):
        disk = tiers["disk"]
        payload = tiers["device"]["used_bytes"] + tiers["host"]["used_bytes"] + disk["used_bytes"] - 64 * disk["blocks"]
        # every block in a tier (disk records carry a 64-byte header); once the KV outgrew the host,
        # the host's blocks have disk copies too (tiers.md), so the host's bytes may count twice
        assert kv <= payload <= kv + tiers["host"]["used_bytes"]
        assert disk["capacity_bytes"] >= kv  # the disk budget was raised to hold the KV
    assert figures["tier_bytes"][1]["disk"] > 0
    assert all(peak > 0 for peak in figures["rss_peak_bytes"])
    assert figures["baseline_ms"][0] is not None and figures["baseline_ms"][1] is None
    assert figures["baseline_skipped"][0] is None and "GiB" in figures["baseline_skipped"][1]
    assert list(tmp_path.iterdir()) == []  # the temporary store is removed
    assert not user_store.exists()


def test_disk_bound_preset_reads_from_disk_against_the_same_run_from_host(decode_model, tmp_path: Path, monkeypatch) -> None:
    # 4 KiB blocks, 2,048 tokens = 64 blocks per run: a 64 KiB host tier (16 blocks) sends most to disk.
    config = Config.load(tiers={"device": 64 * KIB, "host": 64 * KIB, "disk": 64 * KIB, "dtype": "float16"})
    drops = []
    real_drop = decode_module.drop_store_pages
    monkeypatch.setattr(decode_module, "drop_store_pages", lambda store, **kw: drops.append(kw) or real_drop(store, **kw))
    figures = run_disk_bound_bench(config, contexts=(2048,), steps=2, model=decode_model, weights="random", store_dir=tmp_path)
    # the disk run alone: its whole store after the fill, then its records before each of 2 + 2 steps
    assert drops == [{}] + [{"records_only": True}] * 4
    json.dumps(figures)
    disk, host = figures["runs"][0]["disk"], figures["runs"][0]["host"]
    assert figures["disk_share"][0] > 0.5 and figures["disk_blocks_per_step"][0] > 0  # most reads came from disk
    assert host["disk_share"] == 0 and host["disk_blocks_per_step"] == 0  # the host tier held the whole KV
    assert host["tiers_after_fill"]["host"]["used_bytes"] > disk["tiers_after_fill"]["host"]["used_bytes"]
    assert figures["ratio"][0] == pytest.approx(figures["disk_ms"][0] / figures["host_ms"][0])
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_bad_options(cli) -> None:
    assert cli("bench", "decode", "--preset", "billion").exit_code == 2
    assert cli("bench", "decode", "--host-budget", "lots").exit_code == 2
    assert cli("bench", "decode", "--dtype", "int3").exit_code == 2
    for command in (["bench", "decode", "--contexts", "8K"], ["bench", "resume", "--tokens", "2048,x"]):
        result = cli(*command)
        assert result.exit_code == 2 and "positive token counts" in result.output, result.output


@pytest.mark.slow
def test_cli_isolated_run_writes_json(cli, tmp_path: Path) -> None:
    """A fresh process per context (SmolLM2's shape, random weights): its own ru_maxrss."""
    out = tmp_path / "decode.json"
    result = cli(
        "bench", "decode", "--contexts", "1024", "--steps", "1", "--weights", "random", "--isolate",
        "--device-budget", "8MiB", "--host-budget", "8MiB", "--dtype", "float16", "--baseline-max", "1MiB",
        "--store-dir", str(tmp_path / "store"), "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["isolated"] is True and figures["baseline_ms"] == [None]
    # ru_maxrss and the sampled VmRSS sum the kernel's per-CPU RSS counters at different times and
    # ways, so the lifetime peak may read a few hundred KiB below a sampled one (seen: 280 KiB)
    assert figures["rss_lifetime_peak_bytes"][0] >= figures["rss_peak_bytes"][0] - 2**20 > 0
    assert figures["tier_bytes"][0]["disk"] > 0


@pytest.mark.slow
def test_cli_predict_prints_the_cost_models_step_beside_the_measured(cli, tmp_path: Path) -> None:
    """`--predict` (issue 17): the machine measured as `hkv tune` does, a prediction per context."""
    out = tmp_path / "decode.json"
    result = cli(
        "bench", "decode", "--contexts", "1024", "--steps", "1", "--weights", "random", "--no-isolate", "--predict",
        "--device-budget", "8MiB", "--host-budget", "8MiB", "--dtype", "float16", "--baseline-max", "1MiB",
        "--store-dir", str(tmp_path / "store"), "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    (step,) = figures["predicted"]
    assert step["total_ms"] > 0 and step["bound"] in ("compute", "summaries", "host", "disk")
    assert figures["machine"]["cores"] >= 1 and "1024 tokens: predicted" in result.output
    assert cli("bench", "decode", "--predict", "--isolate").exit_code == 2


def test_timed_steps_run_without_autograd(decode_model) -> None:
    """The timed decode steps run under ``torch.inference_mode`` (autograd's bookkeeping made
    hkv's fp16 step 1.6x slower on the CPU when a refactor left them without it)."""
    from transformers import DynamicCache

    from hkv.bench.decode import _time_steps

    seen = []
    hook = decode_model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_inference_mode_enabled()))
    try:
        cache = DynamicCache()
        decode_model(torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
        seen.clear()
        _time_steps(decode_model, cache, steps=2, warmup=1)
    finally:
        hook.remove()
    assert seen and all(seen)
