"""What ``hkv demo`` prints: the prefetch line accounts for every block read (each in one bucket,
the buckets summing to the blocks read; ``--json`` carries them), and the first run's hint repeats
the options that resume the session (``--config``, ``--store``, ``--session``)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from helpers.models import BLOCK, ByteTokenizer, block_bytes, tiny_lm
from hkv import Config
from hkv.cli.demo import PrefetchFigures, report_lines, resume_command, run_demo

PROMPT_TOKENS = 600
READS = re.compile(
    r"^reads: +(\d+) blocks = (\d+) pinned \+ (\d+) predicted, on the device in time \+ (\d+) on the device, "
    r"not predicted \+ (\d+) waited for \+ (\d+) fetched on demand$"
)
HIT = re.compile(r"^prefetch: hit rate ([\d.]+)% = (\d+) / (\d+) blocks read beyond the pinned sink/local ones; (\d+) promoted ahead")


def _model():
    return tiny_lm(max_position_embeddings=4096)


def _config(tmp_path: Path, *, prefetch: bool = True) -> Config:
    """Tiny blocks; a device tier of a few blocks beyond the pinned ones, so blocks spill."""
    size = block_bytes(_model())
    return Config(
        tiers={"device": 16 * size, "host": 256 * size, "disk": 64 * 2**20, "path": str(tmp_path / "store")},
        attention={"mode": "sparse", "block_tokens": BLOCK, "sink_tokens": BLOCK, "local_tokens": 2 * BLOCK,
                   "budget_tokens": 6 * BLOCK, "prefill_chunk_tokens": 64},
        prefetch={"enabled": prefetch},
    )  # fmt: skip


def _reads(lines: list[str]) -> tuple[int, ...]:
    match = [m for m in (READS.match(line) for line in lines) if m]
    assert len(match) == 1, "\n".join(lines)
    return tuple(int(x) for x in match[0].groups())


def test_printed_reads_add_up_to_the_blocks_read_from_figures() -> None:
    """The demo's first run on SmolLM2 printed "hit rate 74.9% (7793/10410 blocks), 0 fetched on
    demand, 0 promoted ahead": 2617 blocks read were in no bucket. They are now named."""
    figures = PrefetchFigures(
        hit_rate=7793 / 10410, needed_blocks=10410, hit_blocks=7793, on_demand_blocks=0, promoted_blocks=0, stall_s=0.0,
        moved_bytes={}, attend_s=1.0, select_s=0.1, read_blocks=13000, pinned_blocks=2590, unpredicted_blocks=2617,
        waited_blocks=0, predicted_blocks=9000,
    )  # fmt: skip
    from hkv.cli.demo import _prefetch_lines

    lines = _prefetch_lines(figures)
    assert lines[0].startswith("prefetch: hit rate 74.9% = 7793 / 10410 blocks read beyond the pinned sink/local ones;")
    assert _reads(lines) == (13000, 2590, 7793, 2617, 0, 0)
    assert sum(figures.buckets.values()) == figures.read_blocks
    off = PrefetchFigures(**{**{f: getattr(figures, f) for f in figures.__dataclass_fields__}, "enabled": False,
                             "hit_rate": 0.0, "hit_blocks": 0, "unpredicted_blocks": 10410})  # fmt: skip
    head = _prefetch_lines(off)[0]
    assert head.startswith("prefetch: off (prefetch.enabled = false); 10410 blocks read beyond") and "hit rate" not in head


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch-on", "prefetch-off"])
def test_demo_report_accounts_for_every_block_read(tmp_path: Path, prefetch: bool) -> None:
    model, tokenizer, config = _model(), ByteTokenizer(), _config(tmp_path, prefetch=prefetch)
    for run in ("first", "resumed"):
        result = run_demo(model, tokenizer, config, tokens=PROMPT_TOKENS, progress=False)
        assert result.resumed == (run == "resumed")
        lines = report_lines(result)
        read, pinned, hit, unpredicted, waited, fetched = _reads(lines)
        assert read == pinned + hit + unpredicted + waited + fetched > 0, lines
        p = result.prefetch
        assert (read, pinned, hit, unpredicted, waited, fetched) == (
            p.read_blocks, p.pinned_blocks, p.hit_blocks, p.unpredicted_blocks, p.waited_blocks, p.on_demand_blocks)
        assert p.needed_blocks == read - pinned
        head = next(line for line in lines if line.startswith("prefetch:"))
        if prefetch:
            m = HIT.match(head)
            assert m, head
            assert (int(m[2]), int(m[3])) == (hit, read - pinned)
            assert float(m[1]) == pytest.approx(100 * hit / (read - pinned), abs=0.05)
        else:
            assert head.startswith(f"prefetch: off (prefetch.enabled = false); {read - pinned} blocks read") and hit == 0
        figures = json.loads(json.dumps(result.as_dict(), default=str))["prefetch"]  # what --json writes
        assert figures["buckets"] == {"pinned": pinned, "hit": hit, "unpredicted": unpredicted, "waited": waited,
                                      "fetched": fetched}  # fmt: skip
        assert sum(figures["buckets"].values()) == figures["read_blocks"] == read


def test_resume_command_repeats_the_options_that_locate_the_session() -> None:
    assert resume_command() == "hkv demo"
    assert resume_command(session="demo", store=None, config=None) == "hkv demo"
    command = resume_command(session="talk 2", store=Path("my store"), config=Path("cfg.toml"))
    assert shlex.split(command) == ["hkv", "demo", "--config", "cfg.toml", "--store", "my store", "--session", "talk 2"]


def test_first_run_hint_names_store_session_and_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import hkv.default_model
    from hkv.cli.app import app

    model = _model()
    monkeypatch.setattr(hkv.default_model, "load_default_model", lambda: (model, ByteTokenizer()))
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(
        f"[tiers]\ndevice = {16 * block_bytes(model)}\nhost = \"1MiB\"\ndisk = \"64MiB\"\n"
        f"[attention]\nblock_tokens = {BLOCK}\nsink_tokens = {BLOCK}\nlocal_tokens = {2 * BLOCK}\n"
        f"budget_tokens = {6 * BLOCK}\nprefill_chunk_tokens = 64\n"
    )
    store = tmp_path / "my store"
    json_path = tmp_path / "demo.json"
    args = ["demo", "--tokens", str(PROMPT_TOKENS), "--config", str(config_file), "--store", str(store), "--session", "s1",
            "--json", str(json_path)]  # fmt: skip
    first = CliRunner().invoke(app, args, env={})
    assert first.exit_code == 0, first.output
    hint = next(line for line in first.output.splitlines() if line.startswith("saved as session"))
    command = re.search(r"run `([^`]+)` again to resume it", hint)
    assert command, hint
    assert shlex.split(command[1]) == ["hkv", "demo", "--config", str(config_file), "--store", str(store), "--session", "s1"]
    buckets = json.loads(json_path.read_text())["prefetch"]["buckets"]
    assert sum(buckets.values()) == json.loads(json_path.read_text())["prefetch"]["read_blocks"] > 0
    # the hinted command resumes the session
    second = CliRunner().invoke(app, shlex.split(command[1])[1:], env={})
    assert second.exit_code == 0, second.output
    assert "session 's1' in" in second.output and "resumed" in second.output, second.output
