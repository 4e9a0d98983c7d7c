"""Smoke test of `hkv bench passkey` on a tiny random Llama: figures, exactness, the PNG, the CLI.

Correctness only (a random model finds no key): hkv exact must answer what full attention
answers, in one call and when the question comes in a later turn after the session was stored
and reopened in a new runtime.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from hkv.bench.passkey import MODES, VARIANTS, run_passkey_bench, table_lines
from hkv.cli.app import app

LENGTH = 1100  # bytes = tokens: 17 blocks, so a 384-token budget selects among them


class ByteTokenizer:
    """One token per byte: enough for passkey_prompt / passkey_answer / sessions."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode(errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    seen: list[int] = []
    out = run_passkey_bench(lengths=(LENGTH,), depths=(0.2, 0.8), trials=1, modes=MODES, variants=VARIANTS,
                            full_max=LENGTH, exact_max=LENGTH, budget=384, model=model, tokenizer=ByteTokenizer(),
                            store_dir=tmp_path_factory.mktemp("stores"), log=lambda line: None,
                            on_run=lambda f: seen.append(len(f["runs"])))  # fmt: skip
    out["_seen"] = seen
    return out


def test_every_mode_variant_and_depth_runs_once(figures):
    runs = figures["runs"]
    assert len(runs) == len(MODES) * len(VARIANTS) * 2
    assert figures["_seen"] == list(range(1, len(runs) + 1)), "on_run after every run, with the runs so far"
    assert {(r["mode"], r["variant"], r["depth"]) for r in runs} == {(m, v, d) for m in MODES for v in VARIANTS for d in (0.2, 0.8)}
    for run in runs:
        assert abs(run["tokens"] - LENGTH) < 40 and len(run["key"]) == 5 and run["seconds"] > 0
        assert run["correct"] == (run["answer"] == run["key"])
    for row in figures["summary"]:
        assert row["trials"] == 2 and row["accuracy"] == row["correct"] / 2
    json.dumps({k: v for k, v in figures.items() if k != "_seen"})


def test_exact_answers_what_full_attention_answers(figures):
    reply = {(r["mode"], r["variant"], r["depth"]): r["reply"] for r in figures["runs"]}
    for variant in VARIANTS:
        for depth in (0.2, 0.8):
            assert reply[("exact", variant, depth)] == reply[("full", variant, depth)]
    # the late variant (stored, reopened in a new runtime) computes what one call computes
    for depth in (0.2, 0.8):
        assert reply[("exact", "late", depth)] == reply[("exact", "single", depth)]


def test_limits_skip_long_prompts(tmp_path):
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)  # fmt: skip
    out = run_passkey_bench(lengths=(300,), depths=(0.5,), modes=("exact", "full", "remap"), full_max=200, exact_max=200,
                            model=LlamaForCausalLM(config).eval(), tokenizer=ByteTokenizer(), store_dir=tmp_path,
                            log=lambda line: None)  # fmt: skip
    assert [r["mode"] for r in out["runs"]] == ["remap"]
    assert out["skipped"] == ["exact beyond 200 tokens", "full beyond 200 tokens"]
    with pytest.raises(ValueError, match="unknown mode"):
        run_passkey_bench(lengths=(300,), modes=("sparse",), model=object(), tokenizer=ByteTokenizer())


def test_table_and_png(figures, tmp_path):
    pytest.importorskip("matplotlib")
    lines = table_lines(figures)
    assert lines[0].split()[:2] == ["variant", "mode"] and len(lines) == 1 + len(MODES) * len(VARIANTS)
    source = tmp_path / "passkey.json"
    source.write_text(json.dumps({k: v for k, v in figures.items() if k != "_seen"}))
    out = tmp_path / "passkey.png"
    result = CliRunner().invoke(app, ["bench", "plot", str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_choices(tmp_path):
    runner = CliRunner()
    bad_mode = runner.invoke(app, ["bench", "passkey", "--modes", "exact,sparse"])
    assert bad_mode.exit_code == 2 and "--modes" in bad_mode.output and "remap" in bad_mode.output
    bad_depth = runner.invoke(app, ["bench", "passkey", "--depths", "0.5,1.5"])
    assert bad_depth.exit_code == 2 and "--depths" in bad_depth.output
    foreign = tmp_path / "other.json"
    foreign.write_text('{"hello": 1}')
    wrong = runner.invoke(app, ["bench", "plot", str(foreign), str(tmp_path / "x.png")])
    assert wrong.exit_code == 2 and "not the JSON" in wrong.output
