"""`hkv bench ruler`'s runner on a tiny model: every mode answers the same prompts, and hkv's exact
mode gives full attention's replies."""

from __future__ import annotations

from pathlib import Path

import pytest

from hkv.bench.ruler import run_ruler_bench, table_lines

from helpers.models import ByteTokenizer


@pytest.mark.slow  # ~10-20 s: three late-variant runs (each stores, reopens and answers)
def test_ruler_runner_compares_modes_on_the_same_prompts(tiny_lm, tmp_path: Path) -> None:
    model = tiny_lm(max_position_embeddings=4096)
    figures = run_ruler_bench(length=700, tasks=("vartrack",), trials=1, modes=("full", "exact", "remap+int4"),
                              budget=384, model=model, tokenizer=ByteTokenizer(), store_dir=tmp_path, log=lambda line: None)  # fmt: skip
    runs = figures["runs"]
    assert len(runs) == 3 and {r["mode"] for r in runs} == {"full", "exact", "remap+int4"}
    by = {(r["task"], r["mode"]): r for r in runs}
    for task in ("vartrack",):
        assert by[(task, "exact")]["reply"] == by[(task, "full")]["reply"]  # exact reproduces the model
        assert by[(task, "exact")]["tokens"] == by[(task, "remap+int4")]["tokens"]  # same prompt
    assert len(table_lines(figures)) == 4  # a header and a row per mode
