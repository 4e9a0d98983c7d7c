"""`hkv sessions gc` and `repair` (issue 16): gc deletes exactly the unreferenced blocks; repair
rebuilds the index, usage and refs from the records, drops what cannot be trusted (reporting
each) and never deletes a record that checks out; both need the store alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hkv import wrap
from hkv.blocks import BlockKey
from hkv.errors import StoreError
from hkv.sessions.store import SessionStore
from hkv.store.files import hold_store
from hkv.store.maintenance import collect_garbage
from hkv.store.segments import list_segments, segment_path
from hkv.tiers.disk import DiskTier

from helpers.cli import assert_clean_error
from helpers.models import baseline, prompt, wrap_config
from helpers.records import LAYOUT, REC, block_for, flip, ids_of, raw_env, rewrite, save

ORPHANS = [BlockKey(bytes([200 + i]) * 16) for i in range(5)]


def _make(path: Path, segments: bool = True) -> dict[str, list[int]]:
    """Sessions "a" (12 tokens) and "b" (sharing a's first 8) and 5 orphan blocks; ``segments``:
    records in segment files (format 3), else in LMDB (format 2)."""
    disk = DiskTier(path, LAYOUT, 64 * REC, writer_batch=8, segments=segments)
    store = SessionStore(disk)
    save(store, "a", ids_of(12), 12)
    save(store, "b", [*ids_of(8), 50, 51, 52, 53, 54], 12)
    disk.put_many(ORPHANS, torch.stack([block_for(key) for key in ORPHANS]))
    disk.close()
    return {"a": ids_of(12).tolist(), "b": [*range(8), 50, 51, 52, 53, 54]}


def _state(path: Path) -> tuple[int, dict[str, int]]:
    with SessionStore.open(path) as store:
        return len(store.disk), {info.name: info.kv_tokens for info in store.list()}


def test_gc_deletes_exactly_the_unreferenced_blocks(store_path: Path, cli) -> None:
    _make(store_path)
    blocks, sessions = _state(store_path)
    done = cli("sessions", "gc", "--store", str(store_path))
    assert done.exit_code == 0 and "gc: 5 unreferenced blocks deleted" in done.output, done.output
    assert _state(store_path) == (blocks - 5, sessions)
    with SessionStore.open(store_path) as store:
        assert not any(store.disk.contains(key) for key in ORPHANS) and store.verify().ok
    again = cli("sessions", "gc", "--store", str(store_path))
    assert "gc: 0 unreferenced blocks deleted" in again.output


def test_gc_and_repair_need_the_store_alone(store_path: Path, cli) -> None:
    _make(store_path)
    held = hold_store(store_path, exclusive=False)  # what every writable open (in any process) holds
    try:
        for command in ("gc", "repair"):
            assert_clean_error(cli("sessions", command, "--store", str(store_path)), "open for writing in another process")
    finally:
        os.close(held)
    with SessionStore.open(store_path, exclusive=True) as alone:
        with pytest.raises(StoreError, match="being repaired or collected"):
            os.close(hold_store(store_path, exclusive=False))  # what another process's open would meet
        assert collect_garbage(alone.disk).deleted == 5
    with pytest.raises(StoreError, match="exclusive"):
        with SessionStore.open(store_path, readonly=False) as plain:
            collect_garbage(plain.disk)


def test_repair_on_a_sound_store_changes_nothing(store_path: Path, cli) -> None:
    _make(store_path)
    before = _state(store_path)
    done = cli("sessions", "repair", "--store", str(store_path))
    assert done.exit_code == 0 and done.output.strip() == f"repair: {before[0]} blocks checked, nothing to repair", done.output
    assert _state(store_path) == before


def test_repair_rebuilds_index_usage_refs_and_drops_what_it_cannot_trust(store_path: Path, cli) -> None:
    ids = _make(store_path, segments=False)  # LMDB records: one missing from the index is indexed again
    with SessionStore.open(store_path) as store:
        a_keys = store.get("a").key_digests()
        b_only = [key for key in store.get("b").key_digests() if key not in a_keys]
    env = raw_env(store_path)
    with env.begin(write=True) as txn:
        txn.delete(ORPHANS[0].__bytes__(), db=env.open_db(b"keys", txn=txn))  # a good record unindexed
        txn.put(b"usage", b'{"used_bytes": -4', db=env.open_db(b"meta", txn=txn))  # garbled
        txn.put(a_keys[0], (7).to_bytes(4, "little"), db=env.open_db(b"refs", txn=txn))  # wrong count
        txn.put(b"s:\xff\xfe", b"junk", db=env.open_db(b"sessions", txn=txn))  # a bad name
        txn.put(bytes(16) + b"r", b"lone summary", db=env.open_db(b"summaries", txn=txn))
    env.close()
    rewrite(store_path, b"blocks", b_only[0], flip(200))  # one of b's own blocks corrupt
    done = cli("sessions", "repair", "--store", str(store_path))
    assert done.exit_code == 0, done.output
    out = done.output
    assert f"block {b_only[0].hex()}: " in out and "dropped" in out
    assert f"block {bytes(ORPHANS[0]).hex()}: not in the key index: indexed again" in out
    assert "the meta/usage row said nothing readable" in out
    assert "1 block refs counts disagreed with the sessions: recounted" in out
    assert "is not a valid session name: dropped" in out and "1 summaries without a block: dropped" in out
    assert "session 'b': 1 of its 6 blocks are missing: its KV dropped, its 13 tokens kept" in out
    verified = cli("sessions", "verify", "--store", str(store_path))
    assert verified.exit_code == 0, verified.output
    with SessionStore.open(store_path) as store:
        assert store.get("a").kv_tokens == 12 and store.get("b").kv_tokens == 0
        assert store.get("b").token_ids.tolist() == ids["b"]
        assert store.disk.contains(ORPHANS[0]) and store.disk.refs([BlockKey(a_keys[0])]) == [1]  # b no longer counts
    assert "nothing to repair" in cli("sessions", "repair", "--store", str(store_path)).output


def test_a_session_repaired_after_block_damage_resumes_token_exact(tiny_lm, tmp_path: Path, cli) -> None:
    model = tiny_lm()
    config = wrap_config(model, tmp_path)
    store = Path(config.tiers.path)
    with wrap(model, config) as rt:
        with rt.session("chat") as session:
            first = session.generate(prompt(100, seed=3)[0], max_new_tokens=2, do_sample=False)[0]
        with rt.session("other") as session:
            other = session.generate(prompt(60, seed=4)[0], max_new_tokens=2, do_sample=False)[0]
    with SessionStore.open(store) as opened:
        key = opened.get("chat").key_digests()[3]
    rewrite(store, b"blocks", key, flip(100))
    assert cli("sessions", "verify", "--store", str(store)).exit_code == 1
    assert cli("sessions", "repair", "--store", str(store)).exit_code == 0
    assert cli("sessions", "verify", "--store", str(store)).exit_code == 0
    more = torch.tensor([1, 2, 3])
    with wrap(model, config) as rt:
        for name, turn in (("chat", first), ("other", other)):
            with rt.session(name) as session:
                out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
            assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()


def test_repair_drops_segment_records_that_fail_and_files_no_entry_names(store_path: Path, cli) -> None:
    """Format 3: a flipped and a truncated segment record lose their index entries (sessions
    using them keep their tokens), a segment file no entry names is deleted, gc then compacts."""
    ids = _make(store_path)
    with SessionStore.open(store_path) as store:
        a_keys = store.get("a").key_digests()
        b_only = [key for key in store.get("b").key_digests() if key not in a_keys]
    rewrite(store_path, b"blocks", b_only[0], flip(200))
    rewrite(store_path, b"blocks", bytes(ORPHANS[1]), lambda record: record[:-7])
    stray = segment_path(store_path, 99)
    stray.write_bytes(b"\0" * 8192)  # a file left by a kill -9 between a compaction's commit and its unlink
    done = cli("sessions", "repair", "--store", str(store_path))
    assert done.exit_code == 0, done.output
    assert f"block {b_only[0].hex()}: checksum mismatch" in done.output
    assert f"block {bytes(ORPHANS[1]).hex()}: truncated payload" in done.output
    assert "1 segment files no index entry named: deleted" in done.output and not stray.exists()
    assert "session 'b': 1 of its 6 blocks are missing: its KV dropped, its 13 tokens kept" in done.output
    assert cli("sessions", "verify", "--store", str(store_path)).exit_code == 0
    with SessionStore.open(store_path) as store:
        assert store.get("a").kv_tokens == 12 and store.get("b").token_ids.tolist() == ids["b"]
        assert not store.disk.contains(ORPHANS[1]) and store.disk.contains(ORPHANS[0])
    assert "nothing to repair" in cli("sessions", "repair", "--store", str(store_path)).output
    collected = cli("sessions", "gc", "--store", str(store_path))
    assert collected.exit_code == 0 and "1 compacted" in collected.output, collected.output
    with SessionStore.open(store_path) as store:
        assert store.verify().ok and store.get("a").kv_tokens == 12
        assert list(list_segments(store_path)) == [max(list_segments(store_path))]  # one segment left
