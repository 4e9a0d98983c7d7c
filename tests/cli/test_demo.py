"""``hkv demo``: a first run prefills and saves a session, a second run resumes it (tiny random
Llama, fast); the real command on SmolLM2 finds the passkey and resumes (slow)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from hkv import Config
from hkv.cli.demo import drop_session, read_record, report_lines, run_demo

transformers = pytest.importorskip("transformers")

BLOCK = 16
PROMPT_TOKENS = 600


@pytest.fixture
def demo_model(tiny_lm) -> torch.nn.Module:
    """A tiny random Llama with sharpened logits (greedy decoding well defined) and room for 4K positions."""
    return tiny_lm("llama", max_position_embeddings=4096)


def _config(tmp_path: Path) -> Config:
    """Tiny blocks; a device tier of a few blocks beyond the pinned ones, so the host tier fills."""
    block_bytes = 2 * 2 * BLOCK * 16 * 4  # [2, kv_heads 2, BLOCK, head_dim 16] fp32
    return Config(
        tiers={"device": 16 * block_bytes, "host": 256 * block_bytes, "disk": 64 * 2**20, "path": str(tmp_path / "store")},
        attention={"mode": "sparse", "block_tokens": BLOCK, "sink_tokens": BLOCK, "local_tokens": 2 * BLOCK,
                   "budget_tokens": 6 * BLOCK, "prefill_chunk_tokens": 64},
    )  # fmt: skip


def test_second_run_resumes_instead_of_prefilling(demo_model, byte_tokenizer, tmp_path: Path) -> None:
    model, tokenizer, config = demo_model, byte_tokenizer, _config(tmp_path)
    first = run_demo(model, tokenizer, config, tokens=PROMPT_TOKENS, progress=False)
    assert not first.resumed and first.restored_kv_tokens == 0
    assert first.prefilled_tokens == first.turn_tokens - 2  # the prompt but the two tokens generate computes
    assert first.reply_tokens > 0 and first.conversation_tokens == first.turn_tokens + first.reply_tokens
    assert len(first.key) == 5 and read_record(config, "demo")["key"] == first.key
    assert {tier.name for tier in first.tiers} == {"device", "host", "disk"}
    assert any(tier.name == "disk" and tier.used_bytes > 0 for tier in first.tiers)  # the session's blocks
    # one timestamp per reply token: the first token's latency, then one interval per decode step
    assert 0 < first.first_token_s <= first.decode_s
    assert len(first.step_ms) == first.reply_tokens - 1 and all(ms > 0 for ms in first.step_ms)
    assert first.first_token_s + sum(first.step_ms) / 1000 <= first.decode_s

    second = run_demo(model, tokenizer, config, tokens=PROMPT_TOKENS, progress=False)
    assert second.resumed
    assert second.restored_kv_tokens == first.conversation_tokens - 1  # every token's KV but the last
    assert second.prefilled_tokens == second.turn_tokens - 1  # only the follow-up turn (its last token: generate)
    assert second.prefilled_tokens < first.prefilled_tokens // 10
    assert second.key == first.key
    assert second.conversation_tokens == first.conversation_tokens + second.turn_tokens + second.reply_tokens
    assert second.first_prefill_s == pytest.approx(first.prefill_s)
    text = "\n".join(report_lines(second))
    assert "resumed" in text and "faster" in text and "ms per step (median of" in text


def test_fresh_drops_the_saved_session(demo_model, byte_tokenizer, tmp_path: Path) -> None:
    model, tokenizer, config = demo_model, byte_tokenizer, _config(tmp_path)
    assert not drop_session(config, "demo")  # no store yet
    first = run_demo(model, tokenizer, config, tokens=PROMPT_TOKENS, progress=False)
    assert drop_session(config, "demo")
    assert read_record(config, "demo") == {}
    again = run_demo(model, tokenizer, config, tokens=PROMPT_TOKENS, progress=False)
    assert not again.resumed and again.conversation_tokens == first.conversation_tokens


def test_demo_command_refuses_a_bad_session_name_before_loading_the_model(cli, tmp_path: Path) -> None:
    result = cli("demo", "--session", "../x", "--store", str(tmp_path / "store"))
    assert result.exit_code == 1 and "error:" in result.output
    assert not (tmp_path / "store").exists()
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = cli("demo", "--store", str(a_file))
    assert result.exit_code == 2 and "not a folder" in result.output, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback


@pytest.mark.slow
def test_hkv_demo_command_finds_the_passkey_and_resumes(cli, smollm2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    import hkv.default_model

    monkeypatch.setattr(hkv.default_model, "load_default_model", lambda: smollm2)  # the model loaded once per test run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no --config: the rates it measures are kept here
    store = str(tmp_path / "store")
    first = cli("demo", "--tokens", "1024", "--store", store)
    assert first.exit_code == 0, first.output
    assert "FOUND" in first.output and "NOT found" not in first.output, first.output
    second = cli("demo", "--tokens", "1024", "--store", store)
    assert second.exit_code == 0, second.output
    assert "resumed" in second.output and "FOUND" in second.output, second.output
    assert "no --config: budgets from hkv tune's plan" in first.output and "rates from quick probe" in second.output
    assert "faster" in second.output


def test_without_a_config_the_demo_takes_the_tuned_budgets(demo_model, byte_tokenizer, tmp_path: Path) -> None:
    """No --config: `hkv tune`'s plan for this machine and the prompt (rates probed once, then
    cached), said in the printed lines, within what is free; the demo runs with it and resumes."""
    from hkv.cli.demo_budgets import ROOM_TOKENS, auto_demo_config

    base = Config.load(env={}, tiers={"path": str(tmp_path / "store")},
                       attention={"block_tokens": BLOCK, "sink_tokens": BLOCK, "local_tokens": 2 * BLOCK, "budget_tokens": 6 * BLOCK,
                                  "prefill_chunk_tokens": 64})  # fmt: skip
    cache = tmp_path / "rates.json"
    config, lines = auto_demo_config(demo_model, base, name="demo", tokens=PROMPT_TOKENS, cache=cache)
    assert lines[0].startswith(f"no --config: budgets from hkv tune's plan for {PROMPT_TOKENS + ROOM_TOKENS} tokens")
    assert "rates measured now" in lines[0] and cache.exists()
    assert config.tiers.path == tmp_path / "store" and config.attention.block_tokens == BLOCK
    assert int(config.tiers.device) + int(config.tiers.host) <= psutil.virtual_memory().available
    first = run_demo(demo_model, byte_tokenizer, config, tokens=PROMPT_TOKENS, progress=False)
    assert not first.resumed and first.conversation_tokens > PROMPT_TOKENS - 16 and first.reply_tokens > 0
    again, lines = auto_demo_config(demo_model, base, name="demo", tokens=PROMPT_TOKENS, cache=cache)
    assert "rates from quick probe" in lines[0]  # cached: no second measurement
    assert again.tiers.dtype == config.tiers.dtype
    second = run_demo(demo_model, byte_tokenizer, again, tokens=PROMPT_TOKENS, progress=False)
    assert second.resumed
