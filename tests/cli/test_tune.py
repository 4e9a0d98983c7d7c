"""`hkv tune` end to end on a tiny shape (issue 17, part 2): it measures, writes a config that
loads, and a tiny model of that shape runs with it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hkv import Config, wrap

from helpers.cli import assert_clean_error


def test_tune_writes_a_config_a_model_runs_with(cli, tiny_lm, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where it keeps the rates for later starts
    out, figures, store = tmp_path / "tuned.toml", tmp_path / "tune.json", tmp_path / "store"
    result = cli("tune", "--context", "4K", "--shape", "layers=2,q_heads=4,kv_heads=2,head_dim=16,dtype=float32",
                 "--sample", "4MiB", "--out", str(out), "--store", str(store), "--json", str(figures))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "predicted step:" in result.output and f"wrote {out}" in result.output
    config = Config.load(out, env={})
    assert "hkv tune" in (tmp_path / "cache" / "hkv" / "rates.json").read_text()  # `hkv demo` reuses them
    plan = json.loads(figures.read_text())["plan"]
    assert plan["prediction"]["total_ms"] > 0 and plan["prediction"]["bound"] in ("compute", "summaries", "host", "disk")
    assert int(config.tiers.device) >= 2 * 2 * 16 * 64 * 2 * 4  # at least the pinned blocks of both layers
    assert config.tiers.path == store and not config.prefetch.enabled or config.prefetch.workers >= 1
    model = tiny_lm()
    with wrap(model, config) as rt:
        out_ids = rt.generate(torch.randint(0, 256, (1, 300)), max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] == 304


def test_tune_names_bad_options(cli, tmp_path: Path) -> None:
    assert_clean_error(cli("tune", "--context", "4K", "--shape", "layers=2", "--out", str(tmp_path / "x.toml")), "--shape", "lacks")
    assert_clean_error(cli("tune", "--context", "4K", "--model", str(tmp_path / "nothing")), "--model")
    bad = cli("tune", "--context", "lots")
    assert bad.exit_code == 2 and "positive token count" in bad.output
