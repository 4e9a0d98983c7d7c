"""Summary runs (hkv/sessions/summary_runs.py): a session's summaries kept together so a resume
reads them in one pass; a run that is damaged, stale or missing costs time, never a wrong result."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
import torch

from hkv import Config, wrap
from hkv.blocks import BlockKey, BlockLayout
from hkv.sessions import summary_runs
from hkv.store import summary_rows
from hkv.store.checksum import checksum
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
        # per layer one array per run, each a view of the memory read (no concatenation, no copy),
        # in fp16: the bounds are rounded outward to fp16 values (BlockSummaries), kept exactly
        assert all(len(layer) == 2 and not any(piece.flags.owndata for piece in layer) for layer in pieces)
        assert all(piece.dtype == np.float16 for layer in pieces for piece in layer)
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


def test_summaries_are_stored_in_fp16_where_exact_and_fp32_where_not() -> None:
    keys = [[bytes([layer, i]) * 8 for i in range(3)] for layer in range(LAYERS)]
    exact = torch.randn(LAYERS, 3, 2, 1, 4).half().float()
    inexact = exact.clone()
    inexact[1, 2, 0, 0, 0] = 1 / 3  # one value that fp16 would change
    for summaries, itemsize in ((exact, 2), (inexact, 4)):
        run = summary_runs.decode_run(summary_runs.encode_run(0, keys, summaries, False, compact=True), 8)
        assert run.values.dtype.itemsize == itemsize and np.array_equal(run.values, summaries.reshape(LAYERS, 3, 8).numpy())
    wide = summary_runs.decode_run(summary_runs.encode_run(0, keys, exact, False), 8)  # a store before format 4
    assert wide.values.dtype == np.float32 and np.array_equal(wide.values, exact.reshape(LAYERS, 3, 8).numpy())
    old = bytearray(summary_runs.encode_run(0, keys, exact, False))  # a run of an hkv before format 4: value bytes 0
    old[8 + 13] = 0
    old[:8] = checksum(bytes(old[8:]))
    assert np.array_equal(summary_runs.decode_run(bytes(old), 8).values, wide.values)
    assert summary_runs.decode_run(bytes(old), 4) is None  # a length that fits no value type

    layout = BlockLayout(1, 4, 4, torch.float16)
    block_keys = [BlockKey(bytes([i]) * 16) for i in range(3)]
    rows = summary_rows.encode_summaries(layout, block_keys, inexact[1], compact=True)
    assert [len(value) for _, _, value in rows] == [8 + 16, 8 + 16, 8 + 32]
    for (_, _, value), summary in zip(rows, inexact[1]):
        assert np.array_equal(summary_values(value, 8).astype(np.float32), summary.reshape(-1).numpy())
        wide_row = summary_rows.stored_row(value, 8, compact=False)  # into a store of format < 4
        assert len(wide_row) == 8 + 32 and np.array_equal(summary_values(wide_row, 8), summary.reshape(-1).numpy())
        assert summary_rows.stored_row(value, 8, compact=True) == value
    damaged = bytearray(rows[0][2])
    damaged[-1] ^= 1
    assert summary_values(bytes(damaged), 8) is None and summary_values(rows[0][2][:-2], 8) is None


def test_a_format_3_store_with_fp32_summaries_resumes_exactly_and_is_upgraded(model, tmp_path, monkeypatch) -> None:
    from hkv.attention import selection
    from hkv.store import block_store

    path = tmp_path / "s"
    ids = prompt(150, seed=21)  # 9 blocks; with the new turn 10
    with monkeypatch.context() as patch:
        patch.setattr(block_store, "STORE_VERSION", 3)  # an hkv of format 3: fp32 summary rows and runs,
        patch.setattr(selection, "fp16_bounds", lambda lo, hi: (lo, hi))  # of bounds not rounded to fp16
        with wrap(model, _config(model, path)) as rt, rt.session("chat") as s:
            assert not rt.manager.store.compact_summaries
            s.append(ids)
            before = [s._cache.sequence.summaries.summary(layer).clone() for layer in range(LAYERS)]
    asked = _lookups(monkeypatch)
    new = prompt(20, seed=22)
    with wrap(model, _config(model, path)) as rt, rt.session("chat") as s:
        assert rt.manager.store.compact_summaries and rt.manager.store.format_version == 4
        record = s._store.get("chat")
        by_layer = [record.key_digests()[layer::LAYERS] for layer in range(LAYERS)]
        [[old_run], _] = s._store.read_summary_runs("chat", by_layer, relative=False)
        assert old_run.dtype == np.float32 and sum(asked) == 0  # the fp32 run, read as it is
        seq = s._cache.sequence
        assert all(torch.equal(seq.summaries.summary(layer), before[layer]) for layer in range(LAYERS))
        assert not torch.equal(before[0].half().float(), before[0])  # values fp16 could not have held
        out = s.generate(new, max_new_tokens=6, do_sample=False)
        record = s._store.get("chat")
        by_layer = [record.key_digests()[layer::LAYERS] for layer in range(LAYERS)]
        pieces = s._store.read_summary_runs("chat", by_layer, relative=False)
    assert torch.equal(out, baseline(model, torch.cat([ids, new], dim=1), 6))
    assert [piece.dtype for piece in pieces[0]] == [np.float32, np.float16]  # the old run stays; later ones are fp16
