"""`hkv sessions ls/show/rm/verify`, the chat loop and `hkv bench resume`, on tiny random models.

The store is made in each test by a tiny random Llama wrapped with hkv; the CLI reads it
without a model. The SmolLM2 chat test is marked slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import pytest
import torch
from typer.testing import CliRunner

import hkv
from hkv.bench import resume as resume_bench
from hkv.cli.chat import TurnEncoder, run_chat
from hkv.cli.app import app

runner = CliRunner()
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip


def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def store_config(path: Path, **attention: Any) -> hkv.Config:
    return hkv.Config.load(tiers={"path": str(path), "device": "4MiB", "host": "4MiB", "disk": "64MiB"},
                           attention={"block_tokens": 16, "sink_tokens": 16, "local_tokens": 32, "budget_tokens": 96,
                                      "prefill_chunk_tokens": 128, **attention})  # fmt: skip


def make_store(path: Path, sessions: dict[str, int]) -> None:
    """Sessions of ``tokens`` random tokens each; the first 64 tokens are shared by all."""
    model = tiny_model()
    prefix = torch.arange(64) % TINY["vocab_size"]
    with hkv.wrap(model, store_config(path)) as rt:
        for i, (name, tokens) in enumerate(sessions.items()):
            rest = torch.randint(0, TINY["vocab_size"], (tokens - 64,), generator=torch.Generator().manual_seed(i))
            with rt.session(name) as session:
                session.append(torch.cat([prefix, rest]), progress=False)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    make_store(path, {"alpha": 300, "beta": 200})
    return path


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), env={})


def assert_clean_error(result: Any, *words: str) -> None:
    """Non-zero exit, one ``error:`` line naming ``words``, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    for word in words:
        assert word in line, result.output


def test_ls_and_show(store: Path) -> None:
    listed = invoke("sessions", "ls", "--store", str(store))
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split() for line in listed.output.splitlines()[1:]}
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"][1] == "300" and rows["beta"][1] == "200"
    shown = invoke("sessions", "show", "alpha", "--store", str(store))
    assert shown.exit_code == 0, shown.output
    fields = dict(line.split(":", 1) for line in shown.output.splitlines())
    assert fields["tokens"].split()[0] == "300"
    assert "LlamaForCausalLM" in fields["model"] and "shared" in fields["blocks"]
    assert int(fields["commits"]) >= 1


def test_ls_reads_store_path_from_config(store: Path, tmp_path: Path) -> None:
    config = tmp_path / "hkv.toml"
    config.write_text(f'[tiers]\npath = "{store}"\n')
    listed = invoke("sessions", "ls", "--config", str(config))
    assert listed.exit_code == 0 and "alpha" in listed.output


def test_verify_ok_then_flipped_byte_names_the_session(store: Path) -> None:
    ok = invoke("sessions", "verify", "--store", str(store))
    assert ok.exit_code == 0 and ok.output.startswith("ok, "), ok.output
    only = invoke("sessions", "verify", "beta", "--store", str(store))
    assert only.exit_code == 0, only.output
    flip_block_byte(store, session_only_key(store, "alpha"))
    bad = invoke("sessions", "verify", "--store", str(store))
    assert bad.exit_code == 1, bad.output
    assert any(line.startswith("alpha:") for line in bad.output.splitlines()), bad.output
    assert not any(line.startswith("beta:") for line in bad.output.splitlines()), bad.output
    assert "Traceback" not in bad.output
    assert invoke("sessions", "verify", "beta", "--store", str(store)).exit_code == 0


def session_only_key(store_path: Path, name: str) -> bytes:
    """A block key referenced by ``name`` only (refs == 1: not the shared prefix)."""
    from hkv.sessions.store import SessionStore

    store = SessionStore.open(store_path, readonly=True)
    try:
        keys = [key for key in store.disk.referenced_keys() if store.disk.refs([key])[0] == 1]
        theirs = set(_session_keys(store, name))
    finally:
        store.close()
    return next(key for key in keys if bytes(key) in theirs)


def _session_keys(store: Any, name: str) -> list[bytes]:
    from hkv.blocks import BlockKey, chain_hashes

    record = store.get(name)
    chains = chain_hashes(record.token_ids[: record.kv_blocks * int(record.layout["block_tokens"])], int(record.layout["block_tokens"]))
    fingerprint = bytes.fromhex(record.identity.fingerprint)
    return [bytes(BlockKey.make(fingerprint, chain, layer)) for chain in chains for layer in range(TINY["num_hidden_layers"])]


def flip_block_byte(store_path: Path, key: bytes) -> None:
    flip_record_byte(store_path, b"blocks", key)


def flip_record_byte(store_path: Path, db: bytes, key: bytes, offset: int = -5) -> None:
    """Flip one byte of a stored value (by default near its end: a block's payload, past the header)."""
    env = lmdb.open(str(store_path), subdir=True, max_dbs=16, lock=True)
    try:
        with env.begin(write=True, db=env.open_db(db)) as txn:
            value = bytearray(txn.get(key))
            value[offset] ^= 0xFF
            txn.put(key, bytes(value))
    finally:
        env.close()


def test_corrupt_session_record_is_listed_and_refused(store: Path) -> None:
    flip_record_byte(store, b"sessions", b"s:alpha")
    listed = invoke("sessions", "ls", "--store", str(store))
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.output.splitlines()[1:]}
    assert "CORRUPT" in rows["alpha"] and "CORRUPT" not in rows["beta"]
    assert_clean_error(invoke("sessions", "show", "alpha", "--store", str(store)), "alpha")
    bad = invoke("sessions", "verify", "--store", str(store))
    assert bad.exit_code == 1 and any(line.startswith("alpha:") for line in bad.output.splitlines()), bad.output
    assert invoke("sessions", "show", "beta", "--store", str(store)).exit_code == 0


def test_rm_deletes_and_keeps_shared_blocks(store: Path) -> None:
    removed = invoke("sessions", "rm", "beta", "--yes", "--store", str(store))
    assert removed.exit_code == 0 and "deleted session 'beta'" in removed.output, removed.output
    listed = invoke("sessions", "ls", "--store", str(store))
    assert "beta" not in listed.output and "alpha" in listed.output
    assert invoke("sessions", "verify", "alpha", "--store", str(store)).exit_code == 0


def test_errors_are_one_line(store: Path, tmp_path: Path) -> None:
    assert_clean_error(invoke("sessions", "show", "nosuch", "--store", str(store)), "nosuch")
    assert_clean_error(invoke("sessions", "rm", "nosuch", "--yes", "--store", str(store)), "nosuch")
    assert_clean_error(invoke("sessions", "show", "../etc", "--store", str(store)))
    assert_clean_error(invoke("sessions", "ls", "--store", str(tmp_path / "missing")), "no hkv store")
    assert_clean_error(invoke("sessions", "verify", "nosuch", "--store", str(store)), "nosuch")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    assert_clean_error(invoke("sessions", "ls", "--store", str(junk)))


# -- the chat loop ------------------------------------------------------------------------------


class CharTokenizer:
    """A byte-level stand-in with a ChatML-like template (ids = byte values, eos = 3)."""

    chat_template = "chatml-like"
    eos_token, eos_token_id = "\x03", 3

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        head = "" if messages and messages[0]["role"] == "system" else "<system>default\x03\n"
        text = head + "".join(f"<{m['role']}>{m['content']}\x03\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i != 3).decode(errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}


def test_turn_encoder_encodes_only_the_new_turn() -> None:
    encoder = TurnEncoder(CharTokenizer(), system="be brief")
    first = encoder.text("hi", first=True)
    assert first == "<system>be brief\x03\n<user>hi\x03\n<assistant>"
    assert encoder.text("again", first=False) == "\n<user>again\x03\n<assistant>"
    # a reply cut by max_new_tokens is closed before the next turn
    assert encoder.text("again", first=False, previous_ended=False) == "\x03\n<user>again\x03\n<assistant>"
    ids = encoder.ids("again", history=torch.tensor([5, 3]))
    assert bytes(ids[0].tolist()).decode() == "\n<user>again\x03\n<assistant>"


def test_chat_resumes_in_a_second_run(tmp_path: Path) -> None:
    model, tokenizer, config = tiny_model(), CharTokenizer(), store_config(tmp_path / "store", mode="exact")
    said: list[str] = []
    first = run_chat(model, tokenizer, ["hello there", "and again"], session="talk", config=config,
                     max_new_tokens=8, system="sys", echo=said.append)  # fmt: skip
    assert "new" in said[0] and len(first) == 2
    assert first[1].conversation_tokens > first[0].conversation_tokens
    said.clear()
    second = run_chat(model, tokenizer, ["third"], session="talk", config=config, max_new_tokens=8, echo=said.append)
    assert f"resumed {first[1].conversation_tokens} tokens" in said[0], said[0]
    assert second[0].conversation_tokens == first[1].conversation_tokens + second[0].prompt_tokens + second[0].reply_tokens
    listed = invoke("sessions", "show", "talk", "--store", str(tmp_path / "store"))
    assert f"tokens:      {second[0].conversation_tokens} " in listed.output, listed.output


def test_chat_refuses_bad_session_name_before_loading() -> None:
    assert_clean_error(runner.invoke(app, ["chat", "--session", "a/b"], input="hi\n", env={}), "a/b")


@pytest.mark.slow
def test_chat_on_smollm2_two_runs(tmp_path: Path) -> None:
    """The second run resumes the first and answers as one uninterrupted conversation would."""
    from hkv.default_model import load_default_model
    from hkv.sessions.store import SessionStore

    model, tokenizer = load_default_model()
    store = tmp_path / "store"
    config = hkv.Config.load(tiers={"path": str(store), "device": "64MiB", "host": "256MiB"}, attention={"mode": "exact"})
    said: list[str] = []
    first = run_chat(model, tokenizer, ["My name is Ada. Say OK."], session="ada", config=config, max_new_tokens=12, echo=said.append)
    said.clear()
    second = run_chat(model, tokenizer, ["What is my name?"], session="ada", config=config, max_new_tokens=12, echo=said.append)
    assert said[0].startswith(f"session 'ada': resumed {first[0].conversation_tokens} tokens"), said[0]
    with SessionStore.open(store, readonly=True) as opened:
        ids = torch.from_numpy(opened.get("ada").token_ids.astype("int64"))
    assert len(ids) == second[0].conversation_tokens
    assert "My name is Ada" in tokenizer.decode(ids[: first[0].conversation_tokens])
    n = second[0].reply_tokens
    with torch.inference_mode():  # the same conversation in one go, transformers' own cache
        plain = model.generate(ids[None, :-n], max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(plain[0, -n:], ids[-n:]) and plain.shape[1] == len(ids)


# -- the resume benchmark -----------------------------------------------------------------------


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
