"""Smoke test of `hkv bench resume` (hkv.bench.resume) on a tiny random model: the figures, and its
stores stay temporary whatever HKV_TIERS__PATH says."""

from __future__ import annotations

from pathlib import Path

import pytest

import hkv
from hkv.bench import resume as resume_bench


@pytest.mark.slow  # a real and a synthetic fill, resumed and re-prefilled: ~20 s on 2 cores
def test_resume_bench_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resume_bench, "REAL_FILL_MAX", 256)  # 256: real prefill; 320: synthetic
    config = hkv.Config.load(tiers={"device": "16MiB", "host": "16MiB", "disk": "256MiB"}, attention={"mode": "exact"})
    figures = resume_bench.run_resume_bench(config, tokens=(256, 320), weights="tiny", folder=tmp_path)
    for key in ("tokens", "resume_s", "reprefill_s", "speedup", "model_load_s", "machine", "hkv_config"):
        assert key in figures
    assert figures["tokens"] == [256, 320] and figures["fill"] == ["real", "synthetic"]
    assert figures["same_first_token"][0] is True  # the resumed session continues as a re-prefill does
    assert figures["same_first_token"][1] is None  # synthetic KV: not comparable
    assert all(s > 0 for s in figures["resume_s"] + figures["reprefill_s"])
    assert figures["restored_kv_tokens"] == [255, 319]
    resume_bench.print_table(figures)


def test_resume_bench_stores_stay_temporary_under_hkv_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HKV_TIERS__PATH", str(tmp_path / "user-store"))
    config = hkv.Config.load()
    assert resume_bench._config(config, tmp_path / "bench").tiers.path == tmp_path / "bench"
