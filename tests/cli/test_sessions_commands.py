"""`hkv sessions ls/show/rm/verify` (hkv.cli.sessions) on stores made by a tiny random Llama wrapped
with hkv; the CLI reads them without a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import pytest
import torch

import hkv

from helpers.cli import assert_clean_error
from helpers.records import rewrite

LAYERS = 2  # the cli_model's


def make_store(path: Path, model: torch.nn.Module, store_config, sessions: dict[str, int]) -> None:
    """Sessions of ``tokens`` random tokens each; the first 64 tokens are shared by all."""
    vocab = model.config.vocab_size
    prefix = torch.arange(64) % vocab
    with hkv.wrap(model, store_config(path)) as rt:
        for i, (name, tokens) in enumerate(sessions.items()):
            rest = torch.randint(0, vocab, (tokens - 64,), generator=torch.Generator().manual_seed(i))
            with rt.session(name) as session:
                session.append(torch.cat([prefix, rest]), progress=False)


@pytest.fixture
def store(store_path: Path, cli_model, cli_config) -> Path:
    make_store(store_path, cli_model, cli_config, {"alpha": 300, "beta": 200})
    return store_path


def test_ls_and_show(cli, store: Path) -> None:
    listed = cli("sessions", "ls", "--store", str(store))
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split() for line in listed.output.splitlines()[1:]}
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"][1] == "300" and rows["beta"][1] == "200"
    shown = cli("sessions", "show", "alpha", "--store", str(store))
    assert shown.exit_code == 0, shown.output
    fields = dict(line.split(":", 1) for line in shown.output.splitlines())
    assert fields["tokens"].split()[0] == "300"
    assert "LlamaForCausalLM" in fields["model"] and "shared" in fields["blocks"]
    assert int(fields["commits"]) >= 1


def test_ls_reads_store_path_from_config(cli, store: Path, tmp_path: Path) -> None:
    config = tmp_path / "hkv.toml"
    config.write_text(f'[tiers]\npath = "{store}"\n')
    listed = cli("sessions", "ls", "--config", str(config))
    assert listed.exit_code == 0 and "alpha" in listed.output


def test_verify_ok_then_flipped_byte_names_the_session(cli, store: Path) -> None:
    ok = cli("sessions", "verify", "--store", str(store))
    assert ok.exit_code == 0 and ok.output.startswith("ok, "), ok.output
    only = cli("sessions", "verify", "beta", "--store", str(store))
    assert only.exit_code == 0, only.output
    flip_block_byte(store, session_only_key(store, "alpha"))
    bad = cli("sessions", "verify", "--store", str(store))
    assert bad.exit_code == 1, bad.output
    assert any(line.startswith("alpha:") for line in bad.output.splitlines()), bad.output
    assert not any(line.startswith("beta:") for line in bad.output.splitlines()), bad.output
    assert "Traceback" not in bad.output
    assert cli("sessions", "verify", "beta", "--store", str(store)).exit_code == 0


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
    return [bytes(BlockKey.make(fingerprint, chain, layer)) for chain in chains for layer in range(LAYERS)]


def flip_block_byte(store_path: Path, key: bytes) -> None:
    def change(record: bytearray) -> bytearray:
        record[-5] ^= 0xFF  # in the payload, past the header
        return record

    rewrite(store_path, b"blocks", key, change)  # in its segment file, or in LMDB


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


def test_corrupt_session_record_is_listed_and_refused(cli, store: Path) -> None:
    flip_record_byte(store, b"sessions", b"s:alpha")
    listed = cli("sessions", "ls", "--store", str(store))
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.output.splitlines()[1:]}
    assert "CORRUPT" in rows["alpha"] and "CORRUPT" not in rows["beta"]
    assert_clean_error(cli("sessions", "show", "alpha", "--store", str(store)), "alpha")
    bad = cli("sessions", "verify", "--store", str(store))
    assert bad.exit_code == 1 and any(line.startswith("alpha:") for line in bad.output.splitlines()), bad.output
    assert cli("sessions", "show", "beta", "--store", str(store)).exit_code == 0


def test_rm_deletes_and_keeps_shared_blocks(cli, store: Path) -> None:
    removed = cli("sessions", "rm", "beta", "--yes", "--store", str(store))
    assert removed.exit_code == 0 and "deleted session 'beta'" in removed.output, removed.output
    listed = cli("sessions", "ls", "--store", str(store))
    assert "beta" not in listed.output and "alpha" in listed.output
    assert cli("sessions", "verify", "alpha", "--store", str(store)).exit_code == 0


def test_errors_are_one_line(cli, store: Path, tmp_path: Path) -> None:
    assert_clean_error(cli("sessions", "show", "nosuch", "--store", str(store)), "nosuch")
    assert_clean_error(cli("sessions", "rm", "nosuch", "--yes", "--store", str(store)), "nosuch")
    assert_clean_error(cli("sessions", "show", "../etc", "--store", str(store)))
    assert_clean_error(cli("sessions", "ls", "--store", str(tmp_path / "missing")), "no hkv store")
    assert_clean_error(cli("sessions", "verify", "nosuch", "--store", str(store)), "nosuch")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    assert_clean_error(cli("sessions", "ls", "--store", str(junk)))
