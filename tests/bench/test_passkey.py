"""Smoke test of `hkv bench passkey` on a tiny random Llama: figures, exactness, the PNG, the CLI.

Correctness only (a random model finds no key): hkv exact must answer what full attention
answers, in one call and when the question comes in a later turn after the session was stored
and reopened in a new runtime.
"""

from __future__ import annotations

import json

import pytest

from hkv.bench.passkey import MODES, VARIANTS, run_passkey_bench, table_lines

LENGTH = 1100  # bytes = tokens: 17 blocks, so a 384-token budget selects among them


@pytest.fixture(scope="module")
def figures(tiny_lm, byte_tokenizer, tmp_path_factory):
    model = tiny_lm("llama", sharpen=None, max_position_embeddings=512)
    seen: list[int] = []
    out = run_passkey_bench(lengths=(LENGTH,), depths=(0.2, 0.8), trials=1, modes=MODES, variants=VARIANTS,
                            full_max=LENGTH, exact_max=LENGTH, budget=384, model=model, tokenizer=byte_tokenizer,
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


def test_limits_skip_long_prompts(tiny_lm, byte_tokenizer, tmp_path):
    model = tiny_lm("llama", layers=1, seed=1, sharpen=None, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=512)
    out = run_passkey_bench(lengths=(300,), depths=(0.5,), modes=("exact", "full", "remap"), full_max=200, exact_max=200,
                            model=model, tokenizer=byte_tokenizer, store_dir=tmp_path,
                            log=lambda line: None)  # fmt: skip
    assert [r["mode"] for r in out["runs"]] == ["remap"]
    assert out["skipped"] == ["exact beyond 200 tokens", "full beyond 200 tokens"]
    with pytest.raises(ValueError, match="unknown mode"):
        run_passkey_bench(lengths=(300,), modes=("sparse",), model=object(), tokenizer=byte_tokenizer)


def test_table_and_png(cli, figures, tmp_path):
    pytest.importorskip("matplotlib")
    lines = table_lines(figures)
    assert lines[0].split()[:2] == ["variant", "mode"] and len(lines) == 1 + len(MODES) * len(VARIANTS)
    source = tmp_path / "passkey.json"
    source.write_text(json.dumps({k: v for k, v in figures.items() if k != "_seen"}))
    out = tmp_path / "passkey.png"
    result = cli("bench", "plot", str(source), str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_choices(cli, tmp_path):
    bad_mode = cli("bench", "passkey", "--modes", "exact,sparse")
    assert bad_mode.exit_code == 2 and "--modes" in bad_mode.output and "remap" in bad_mode.output
    bad_depth = cli("bench", "passkey", "--depths", "0.5,1.5")
    assert bad_depth.exit_code == 2 and "--depths" in bad_depth.output
    foreign = tmp_path / "other.json"
    foreign.write_text('{"hello": 1}')
    wrong = cli("bench", "plot", str(foreign), str(tmp_path / "x.png"))
    assert wrong.exit_code == 2 and "not the JSON" in wrong.output
