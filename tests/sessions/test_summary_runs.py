"""Summary runs (hkv/sessions/summary_runs.py): a session's summaries kept together so a resume
reads them in one pass; a run that is damaged, stale or missing costs time, never a wrong result."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
import torch

from hkv import Config, wrap
from hkv.sessions import summary_runs
from hkv.store import summary_rows
from hkv.store.summary_rows import summary_values
from hkv.store.txn import summary_key

from helpers.models import BLOCK, baseline, block_bytes, prompt

pytest.importorskip("transformers")
LAYERS = 2


@pytest.fixture(scope="module")
def model(tiny_lm):
    return tiny_lm("llama", layers=LAYERS)


def _config(model, path) -> Config:
    size = block_bytes(model)
    return Config(
        tiers={"device": (LAYERS * 3 + 6) * size, "host": 8 * size, "disk": 64 * 2**20, "path": str(path)},
        attention={"mode": "exact", "block_tokens": BLOCK, "sink_tokens": BLOCK, "local_tokens": 2 * BLOCK,
                   "budget_tokens": 6 * BLOCK, "prefill_chunk_tokens": 64},
    )  # fmt: skip


def _run_keys(path) -> list[bytes]:
    env = lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            sessions = env.open_db(b"sessions", txn=txn, create=False)
            return [bytes(k) for k in txn.cursor(db=sessions).iternext(values=False) if bytes(k).startswith(b"u:")]
    finally:
        env.close()


def _lookups(monkeypatch) -> list[int]:
    """Count the keys each per-block summary read asks for (the real reads still run)."""
    asked: list[int] = []
    real = summary_rows.SummaryRows.read

    def counting(self, keys, out, *, relative=False):
        asked.append(len(keys))
        return real(self, keys, out, relative=relative)

    monkeypatch.setattr(summary_rows.SummaryRows, "read", counting)
    return asked


def test_a_resume_reads_its_summaries_from_the_runs_and_matches_the_rows(model, tmp_path, monkeypatch) -> None:
    path = tmp_path / "s"
    first, second = prompt(150, seed=1), prompt(70, seed=2)
    with wrap(model, _config(model, path)) as rt, rt.session("chat") as s:
        out1 = s.generate(first, max_new_tokens=6, do_sample=False)
        s.generate(second, max_new_tokens=6, do_sample=False)
        blocks = s._cache.sequence.sealed_blocks()
    keys = _run_keys(path)
    assert len(keys) == 2 and all(key.startswith(b"u:chat\x00") for key in keys)  # one run per commit
    asked = _lookups(monkeypatch)
    with wrap(model, _config(model, path)) as rt, rt.session("chat") as s:
        assert s.restored.adopted_blocks == blocks
        assert sum(asked) == 0  # every summary came from the runs
        record = s._store.get("chat")
        digests = record.key_digests()
        by_layer = [digests[layer::LAYERS] for layer in range(LAYERS)]
        pieces = s._store.read_summary_runs("chat", by_layer, relative=False)
        # per layer one array per run, each a view of the memory read (no concatenation, no copy)
        assert all(len(layer) == 2 and not any(piece.flags.owndata for piece in layer) for layer in pieces)
        runs = [np.concatenate(layer) for layer in pieces]
        with s._store.disk.reading() as txn:
            floats = runs[0].shape[1]
            for layer in range(LAYERS):
                rows = [summary_values(txn.get("summaries", summary_key(key, False)), floats) for key in by_layer[layer]]
                assert np.array_equal(runs[layer], np.stack(rows))  # the same summaries as the per-block rows
        history = s.tokens[None]
        out3 = s.generate(prompt(5, seed=3), max_new_tokens=6, do_sample=False)
    assert torch.equal(history[:, : out1.shape[1]], out1)
    assert torch.equal(out3, baseline(model, torch.cat([history, prompt(5, seed=3)], dim=1), 6))  # token-exact


def test_a_damaged_run_is_skipped_and_the_resume_stays_exact(model, tmp_path, monkeypatch) -> None:
    path = tmp_path / "s"
    ids = prompt(150, seed=11)
    with wrap(model, _config(model, path)) as rt, rt.session("chat") as s:
        s.append(ids)
    [key] = _run_keys(path)
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        sessions = env.open_db(b"sessions", txn=txn, create=False)
        value = bytearray(txn.get(key, db=sessions))
        value[-3] ^= 0x10
        txn.put(key, bytes(value), db=sessions)
    env.close()
    asked = _lookups(monkeypatch)
    new = prompt(4, seed=12)
    with wrap(model, _config(model, path)) as rt, rt.session("chat") as s:
        assert s.restored.adopted_blocks == 149 // BLOCK
        assert sum(asked) > 0  # read one by one instead
        out = s.generate(new, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, baseline(model, torch.cat([ids, new], dim=1), 6))
    assert len(_run_keys(path)) == 1  # the next commit kept a sound run (the damaged one was replaced)


def test_rm_and_repair_drop_the_runs(model, tmp_path, cli) -> None:
    path = tmp_path / "s"
    with wrap(model, _config(model, path)) as rt:
        for name, seed in (("a", 21), ("b", 22)):
            with rt.session(name) as s:
                s.append(prompt(100, seed=seed))
    assert {key.split(b"\x00")[0] for key in _run_keys(path)} == {b"u:a", b"u:b"}
    listed = cli("sessions", "ls", "--store", str(path))
    assert listed.exit_code == 0 and "u:" not in listed.output  # runs are not sessions
    assert cli("sessions", "verify", "--store", str(path)).exit_code == 0
    assert cli("sessions", "rm", "a", "--store", str(path), "--yes").exit_code == 0
    assert {key.split(b"\x00")[0] for key in _run_keys(path)} == {b"u:b"}
    assert cli("sessions", "repair", "--store", str(path)).exit_code == 0
    assert _run_keys(path) == []
    with wrap(model, _config(model, path)) as rt, rt.session("b") as s:  # per-block rows, then runs again
        assert s.restored.adopted_blocks == 99 // BLOCK
        s.append(prompt(3, seed=23))
    assert len(_run_keys(path)) == 1


def test_runs_past_the_kept_history_are_deleted_and_a_gap_is_refused(model, tmp_path) -> None:
    with wrap(model, _config(model, tmp_path / "s")) as rt:
        store = rt.session_store()
        value = lambda first, count: summary_runs.encode_run(first, [[b"k" * 16] * 8] * LAYERS, torch.zeros(LAYERS, count, 2, 1, 1), False)  # noqa: E731
        assert store.put_summary_run("x", 0, 2, value(0, 2))
        assert store.put_summary_run("x", 2, 3, value(2, 3))
        assert not store.put_summary_run("x", 6, 1, value(6, 1))  # a gap: blocks 5..6 not covered
        with store.disk.reading() as txn:
            assert summary_runs.run_keys(txn, "x") == [summary_runs.run_key("x", 0, 2), summary_runs.run_key("x", 2, 3)]
        store.disk.apply(lambda txn: summary_runs.delete_runs(txn, "x", keep_blocks=4))  # history kept up to block 4
        with store.disk.reading() as txn:
            assert summary_runs.run_keys(txn, "x") == [summary_runs.run_key("x", 0, 2)]
