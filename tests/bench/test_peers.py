"""Smoke test of the peers benchmark's local side (benchmarks/peers/run.py) on a tiny random Llama:
correctness of the figures only.

The kvpress side (its own virtualenv) is not created here: ``peers=False``. The benchmark lives
outside the hkv package, in ``benchmarks/peers``; it is imported as the package ``peers`` with
``benchmarks/`` on ``sys.path``, as ``run.py`` does itself when run as a script.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from peers.methods import LOCAL_METHODS  # noqa: E402
from peers.run import DECOY, TASKS, build_prompts, print_table, run_peers_bench  # noqa: E402


class ByteTokenizer:
    """One token per byte: enough for passkey_prompt / passkey_answer."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    return LlamaForCausalLM(config).eval(), ByteTokenizer()


def test_prompts_late_question_keeps_the_document():
    tok = ByteTokenizer()
    prompts = build_prompts(tok, 600, 2)
    single = [p for p in prompts if p["task"] == "single"]
    late = [p for p in prompts if p["task"] == "late"]
    assert len(single) == len(late) == 2
    for s, l in zip(single, late):
        assert s["key"] == l["key"] and s["key"] in tok.decode(l["context"])
        assert "pass key?" not in tok.decode(l["context"]), "the late task's context must not hold the question"
        assert tok.decode(l["context"]).endswith(DECOY), "every method sees the same earlier exchange"
        assert tok.decode(l["turns"][-1]["input"]).endswith("The pass key is")
        assert tok.decode(s["context"] + s["turns"][0]["input"]).endswith("The pass key is")


def test_peers_bench_local_side(tiny, capsys, tmp_path):
    model, tok = tiny
    figures = run_peers_bench(tokens=300, trials=1, peers=False, model=model, tokenizer=tok, log=lambda line: None)
    json.dumps(figures)  # what --json writes
    rows = figures["rows"]
    assert {(r["method"], r["task"]) for r in rows} == {(m, t) for m in LOCAL_METHODS for t in TASKS}
    full = figures["full_kv_bytes"]
    for row in rows:
        assert set(row) >= {"method", "task", "accuracy", "trials", "decode_ms", "peak_rss_mib", "kv_device_bytes", "kv_total_bytes"}
        assert row["trials"] == 1 and 0.0 <= row["accuracy"] <= 1.0
        assert row["decode_ms"] > 0 and row["peak_rss_mib"] > 0
        assert 0 < row["kv_device_bytes"] <= row["kv_total_bytes"]
        if row["method"] != "DynamicCache":  # every bounded method holds at most ~25% (+ the turns) on the device
            assert row["kv_device_bytes"] <= 0.3 * full, row
    by = {(r["method"], r["task"]): r for r in rows}
    assert by[("DynamicCache", "late")]["kv_device_bytes"] >= full
    # hkv exact computes what full attention computes: same answers on the same prompts.
    answers = {(r["method"], r["id"]): r["answer"] for r in figures["records"]}
    for record in figures["records"]:
        if record["method"] == "hkv exact":
            assert record["answer"] == answers[("DynamicCache", record["id"])]
    assert set(figures["not_run"]) >= {"kvpress SnapKV", "kvpress StreamingLLM", "kvpress ExpectedAttention"}
    print_table(figures)
    assert "hkv sparse" in capsys.readouterr().out
    # `hkv bench plot` draws the JSON the benchmark writes
    from typer.testing import CliRunner

    from hkv.bench.plots import kind_of
    from hkv.cli.app import app

    assert kind_of(figures) == "peers"
    (tmp_path / "peers.json").write_text(json.dumps(figures, default=str))
    drawn = CliRunner().invoke(app, ["bench", "plot", str(tmp_path / "peers.json"), str(tmp_path / "peers.png")])
    assert drawn.exit_code == 0, drawn.output
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_peers_command_runs_as_a_script():
    """``python benchmarks/peers/run.py`` finds its sibling modules and has the old command's options;
    a bad --tasks exits 2 before any model loads."""
    import os

    script = str(BENCHMARKS / "peers" / "run.py")
    wide = {**os.environ, "COLUMNS": "200"}  # the help table is not wrapped
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120, env=wide)
    assert shown.returncode == 0, shown.stderr
    for option in ("--json", "--tokens", "--trials", "--venv", "--no-peers", "--parallel", "--png", "--max-minutes", "--tasks", "--methods"):
        assert option in shown.stdout, option
    bad = subprocess.run([sys.executable, script, "--tasks", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--tasks" in bad.stderr
    # the kvpress side is a standalone script beside it (start_kvpress runs it by path in the venv)
    child = subprocess.run([sys.executable, str(BENCHMARKS / "peers" / "child.py")], capture_output=True, text=True, timeout=120)
    assert child.returncode == 1 and "usage: python child.py JOB.json RESULT.json" in child.stderr


def test_peers_venv_sees_this_torch_even_without_system_packages(tmp_path):
    """A venv that does not see this torch (as when hkv itself runs in a virtualenv) gets it via a
    .pth file, so that the pinned pip install never fetches another (CUDA) build."""
    import venv as venv_module

    from peers.run import _venv_python, _venv_torch, share_torch

    venv_module.create(tmp_path / "v", system_site_packages=False, with_pip=False)
    python = _venv_python(tmp_path / "v")
    assert _venv_torch(python) is None
    share_torch(python)
    assert _venv_torch(python) == torch.__version__
    # the venv's own packages still come first
    order = subprocess.run([str(python), "-c", "import sys; print(sys.path)"], capture_output=True, text=True, check=True).stdout
    assert order.index(str(tmp_path / "v")) < order.index(str(Path(torch.__file__).resolve().parents[1]))
