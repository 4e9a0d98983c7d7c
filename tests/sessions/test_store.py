"""The session store (hkv.sessions.store) over the LMDB block store, format 2: commit / refs /
delete, reclaim, verify, the format's version and upgrade, opening an existing store."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hkv.blocks import HEADER_SIZE, BlockKey
from hkv.errors import StoreError, TierError
from hkv.sessions.records import CorruptSessionError, SessionError, SessionNotFoundError
from hkv.sessions.store import SessionStore
from hkv.store.block_store import STORE_VERSION
from hkv.store.summary_rows import SummaryRows
from hkv.tiers.disk import DiskTier

from helpers.records import (
    LAYERS,
    LAYOUT,
    REC,
    block_for,
    flip,
    identity,
    ids_of,
    keys_for,
    make_record,
    raw_env,
    rewrite,
    save,
    summary_for,
    tail_for,
)


# -- commit, refs, delete -----------------------------------------------------------------------


def test_commit_then_get_in_a_new_disk_tier(store_path: Path) -> None:
    ids = ids_of(11)  # 2 blocks of 4 + a 2-token tail, one token whose KV is not computed
    with DiskTier(store_path, LAYOUT, 64 * REC) as disk:
        record, result = save(SessionStore(disk), "chat", np.append(ids, 99), kv_tokens=10)
        assert len(result.newly_referenced) == 2 * LAYERS and result.deleted == []
        assert record.commits == 1 and record.created == record.updated == record.last_used > 0
    with DiskTier(store_path, LAYOUT, 64 * REC) as disk:
        store = SessionStore(disk)
        back = store.get("chat")
        assert back.token_ids.tolist() == [*range(11), 99] and (back.kv_tokens, back.kv_blocks, back.tail_tokens) == (10, 2, 2)
        assert back.identity == identity() and back.commits == 1 and store.get("missing") is None
        keys = keys_for(ids, 2)
        tail = torch.empty(LAYERS, 2, LAYOUT.kv_heads, 2, LAYOUT.head_dim, dtype=LAYOUT.dtype)
        store.read_tail(back, tail)
        assert torch.equal(tail, tail_for("chat", 2))
        summaries = torch.empty(len(keys) + 1, 2, LAYOUT.kv_heads, LAYOUT.head_dim)
        assert SummaryRows(store.disk).read([*keys, BlockKey(bytes(16))], summaries) == len(keys)
        assert torch.equal(summaries[: len(keys)], torch.stack([summary_for(k) for k in keys]))
        assert SummaryRows(store.disk).present(keys) == len(keys) and SummaryRows(store.disk).present([BlockKey(bytes(16)), *keys]) == 0
        assert store.disk.refs(keys) == [1] * len(keys) and sorted(store.disk.referenced_keys()) == sorted(map(bytes, keys))
        info = store.info("chat")
        assert (info.tokens, info.kv_tokens, info.kv_blocks, info.num_layers, info.missing_blocks) == (12, 10, 2, 2, 0)
        assert info.stored_bytes > len(keys) * REC and info.model == "TinyLM 2x4/2x8 float16 fp=00010203"
        assert store.names() == ["chat"] and [i.name for i in store.list()] == ["chat"]
        assert store.verify().ok


def test_two_sessions_share_their_prefix_blocks(store: SessionStore) -> None:
    shared = ids_of(12)  # 3 shared blocks
    save(store, "a", np.concatenate([shared, ids_of(8, 100)]), kv_tokens=20)  # 5 blocks
    _, result = save(store, "b", np.concatenate([shared, ids_of(8, 200)]), kv_tokens=20)
    assert len(result.newly_referenced) == 2 * LAYERS  # only b's own blocks
    assert len(store.disk) == (3 + 2 + 2) * LAYERS  # the shared prefix is stored once
    shared_keys = keys_for(shared, 3)
    assert store.disk.refs(shared_keys) == [2] * len(shared_keys)
    assert store.info("a").shared_blocks == 3 * LAYERS

    a_only = keys_for(np.concatenate([shared, ids_of(8, 100)]), 5)[3 * LAYERS :]
    result = store.delete("a")
    assert sorted(result.deleted) == sorted(map(bytes, a_only)) and result.freed_bytes == len(a_only) * REC
    assert store.disk.refs(shared_keys) == [1] * len(shared_keys) and all(store.disk.contains(k) for k in shared_keys)
    assert not any(store.disk.contains(k) for k in a_only) and store.names() == ["b"]
    with pytest.raises(SessionNotFoundError, match="'a'"):
        store.delete("a")
    store.delete("b")
    assert len(store.disk) == 0 and store.disk.used_bytes() == 0 and store.disk.referenced_keys() == []


def test_recommit_moves_refs_and_keeps_unreferenced_blocks(store: SessionStore) -> None:
    first, _ = save(store, "chat", ids_of(9), kv_tokens=8)
    grown, result = save(store, "chat", ids_of(17), kv_tokens=16)  # 2 more blocks
    assert len(result.newly_referenced) == 2 * LAYERS and result.unreferenced == []
    assert grown.commits == 2 and grown.created == first.created and grown.updated >= first.updated
    rewound = np.concatenate([ids_of(4), ids_of(6, 500)])  # differs from token 4 on: blocks 1..3 are dropped
    _, result = save(store, "chat", rewound, kv_tokens=9)
    old = keys_for(ids_of(17), 4)[LAYERS:]
    assert sorted(result.unreferenced) == sorted(map(bytes, old)) and result.deleted == []
    assert all(store.disk.contains(k) for k in old) and store.disk.refs(old) == [0] * len(old)  # kept, evictable
    assert store.disk.refs(keys_for(rewound, 2)) == [1] * 2 * LAYERS and store.verify().ok


def test_commit_refuses_missing_blocks_and_changes_nothing(store: SessionStore) -> None:
    save(store, "chat", ids_of(8), kv_tokens=8)
    before = store.get("chat")
    record = make_record("chat", ids_of(16), kv_tokens=16)
    keys = keys_for(ids_of(16), 4)
    with pytest.raises(SessionError, match=f"{2 * LAYERS} of {2 * LAYERS} newly referenced blocks are not in the store"):
        store.commit(record, block_keys=keys, summaries=None, summary_keys=[], tail=None)
    after = store.get("chat")
    assert after.token_ids.tolist() == before.token_ids.tolist() and after.commits == 1
    with pytest.raises(SessionError, match="distinct block keys"):
        store.commit(record, block_keys=keys[:3], summaries=None, summary_keys=[], tail=None)
    with pytest.raises(SessionError, match="kv_tokens 9 != kv_blocks 2"):
        bad = make_record("chat", ids_of(9), 8)
        bad.kv_tokens = 9
        store.commit(bad, block_keys=keys[: 2 * LAYERS], summaries=None, summary_keys=[], tail=None)


def test_delete_keeps_blocks_in_use_and_disk_deletes_skip_referenced(store: SessionStore) -> None:
    save(store, "chat", ids_of(16), kv_tokens=16)
    keys = keys_for(ids_of(16), 4)
    result = store.disk.delete_many(keys[:3])  # the block store never deletes a referenced block
    assert result.deleted == [] and result.kept == [bytes(k) for k in keys[:3]]
    busy = {bytes(keys[0]), bytes(keys[5])}
    result = store.delete("chat", in_use=lambda key: key in busy)
    assert sorted(result.unreferenced) == sorted(busy) and len(result.deleted) == len(keys) - 2
    assert [store.disk.contains(k) for k in keys].count(True) == 2 and store.disk.delete_many(keys[:1]).deleted == [bytes(keys[0])]


def test_a_failing_apply_job_changes_nothing_and_spares_its_batch(store: SessionStore) -> None:
    def failing(txn) -> None:
        txn.put("sessions", b"x:partial", b"1")
        txn.delete_block(bytes(keys[0]))
        raise ValueError("boom")

    def fine(txn) -> str:
        txn.put("sessions", b"x:fine", b"1")
        return "done"

    keys = keys_for(ids_of(8), 2)
    store.disk.put_many(keys, torch.stack([block_for(k) for k in keys]))
    gate = threading.Event()
    blocker = store.disk.submit_apply(lambda txn: gate.wait(5))  # holds the writer so the next three batch together
    futures = [
        store.disk.submit_apply(failing), store.disk.submit_apply(fine),
        store.disk.submit_put_many([BlockKey(bytes(16))], block_for(keys[0])[None]),
    ]  # fmt: skip
    gate.set()
    blocker.result()
    with pytest.raises(ValueError, match="boom"):
        futures[0].result()
    assert futures[1].result() == "done" and futures[2].result() is None
    with store.disk.reading() as txn:
        assert txn.get("sessions", b"x:partial") is None and txn.get("sessions", b"x:fine") == b"1"
    assert store.disk.contains(keys[0]) and len(store.disk) == len(keys) + 1 and store.disk.used_bytes() == (len(keys) + 1) * REC


# -- reclaim, verify ------------------------------------------------------------------------------


def test_reclaim_drops_the_least_recently_used_sessions_kv(store: SessionStore) -> None:
    save(store, "old", ids_of(11, 1000), kv_tokens=10)
    save(store, "new", ids_of(11, 2000), kv_tokens=10)
    save(store, "open", ids_of(11, 3000), kv_tokens=10)
    store.touch("new")
    used = store.disk.used_bytes()
    result = store.reclaim(1, skip={"open"}, in_use=lambda key: False)
    assert result.sessions == ["old"] and result.freed_bytes == 2 * LAYERS * REC and len(result.deleted) == 2 * LAYERS
    assert store.disk.used_bytes() == used - result.freed_bytes
    old = store.get("old")
    assert (old.kv_tokens, old.kv_blocks, old.tail_tokens) == (0, 0, 0) and old.token_ids.tolist() == list(range(1000, 1011))
    assert store.info("old").stored_bytes == 0 and store.verify().ok
    with store.lock("new"):  # held here, as by an open session: not reclaimed
        result = store.reclaim(3 * LAYERS * REC, skip={"open"}, in_use=lambda key: False)
    assert result.sessions == [] and result.freed_bytes == 0
    result = store.reclaim(3 * LAYERS * REC, skip=set(), in_use=lambda key: False)
    assert result.sessions == ["open", "new"] and store.disk.used_bytes() == 0  # "open" was used less recently


def _corrupt_store(path: Path) -> None:
    """Sessions a..f of 2 blocks + tail each, then one thing damaged in each of a, b, c, d, f."""
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
        store = SessionStore(disk)
        for i, name in enumerate("abcdef"):
            save(store, name, ids_of(11, 100 * i), kv_tokens=10)
    rewrite(path, b"blocks", bytes(keys_for(ids_of(11, 0), 2)[3]), flip(HEADER_SIZE + 5))  # a: a block
    rewrite(path, b"summaries", bytes(keys_for(ids_of(11, 100), 2)[1]), flip(20))  # b: a summary
    rewrite(path, b"sessions", b"t:c", flip(HEADER_SIZE + 3))  # c: its tail
    rewrite(path, b"sessions", b"s:d", flip(30))  # d: its record
    rewrite(path, b"sessions", b"s:f", lambda value: value[: len(value) // 2])  # f: a truncated record


def test_verify_names_each_damaged_session_and_the_others_stay_usable(store_path: Path) -> None:
    _corrupt_store(store_path)
    with DiskTier(store_path, LAYOUT, 64 * REC) as disk:
        store = SessionStore(disk)
        report = store.verify()
        assert not report.ok and report.checked_blocks == 4 * 2 * LAYERS  # d and f: no record, no blocks known
        assert [name for name, problems in report.problems.items() if problems] == ["a", "b", "c", "d", "f"]
        assert "block 1 layer 1" in report.problems["a"][0] and "checksum" in report.problems["a"][0]
        assert "summary" in report.problems["b"][0]
        assert "'c' tail" in report.problems["c"][0] and "checksum" in report.problems["c"][0]
        assert "'d'" in report.problems["d"][0] and "checksum" in report.problems["d"][0]
        assert "'f'" in report.problems["f"][0]
        assert store.verify("e").ok and not store.verify("a").ok
        with pytest.raises(SessionNotFoundError):
            store.verify("zz")
        with pytest.raises(CorruptSessionError, match="'d'"):
            store.get("d")
        with pytest.raises(CorruptSessionError, match="'c' tail.*checksum"):
            c = store.get("c")
            store.read_tail(c, torch.empty(LAYERS, 2, LAYOUT.kv_heads, 2, LAYOUT.head_dim, dtype=LAYOUT.dtype))
        summaries = torch.empty(2 * LAYERS, 2, LAYOUT.kv_heads, LAYOUT.head_dim)
        assert SummaryRows(store.disk).read(keys_for(ids_of(11, 100), 2), summaries) == 1  # stops at the corrupt one
        listed = {info.name: info for info in store.list()}
        assert listed["d"].tokens == -1 and "checksum" in listed["d"].model and listed["e"].tokens == 11
        store.delete("d")  # a corrupt record can be removed; its blocks stay referenced
        assert "d" not in store.names() and store.verify("e").ok


def test_verify_all_reports_refs_fewer_than_the_sessions_using_a_block(store_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 64 * REC) as disk:
        store = SessionStore(disk)
        save(store, "a", ids_of(9), kv_tokens=8)
        save(store, "b", ids_of(13), kv_tokens=12)  # shares a's 2 blocks
        assert store.verify().ok and store.disk.refs(keys_for(ids_of(9), 2)) == [2] * 2 * LAYERS
    shared = bytes(keys_for(ids_of(9), 2)[1])
    rewrite(store_path, b"refs", shared, lambda value: (1).to_bytes(4, "little"))
    with DiskTier(store_path, LAYOUT, 64 * REC) as disk:
        report = SessionStore(disk).verify()
        line = f"block 0 layer 1 ({shared.hex()}): has refs 1 but 2 sessions reference it"
        assert report.problems == {"a": [f"session 'a': {line}"], "b": [f"session 'b': {line}"]}
        assert SessionStore(disk).verify("a").ok  # one session alone cannot tell


# -- the store's format and opening an existing store ---------------------------------------------


def test_a_future_store_version_is_refused_untouched(store_path: Path) -> None:
    DiskTier(store_path, LAYOUT, 8 * REC).close()
    env = raw_env(store_path)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        stored = json.loads(txn.get(b"format"))
        assert stored["format_version"] == STORE_VERSION == 4
        txn.put(b"format", json.dumps({**stored, "format_version": 5}).encode())
    env.close()
    before = (store_path / "data.mdb").read_bytes()
    for opener in (lambda: DiskTier(store_path, LAYOUT, 8 * REC), lambda: DiskTier.open_existing(store_path, readonly=False),
                   lambda: SessionStore.open(store_path)):  # fmt: skip
        with pytest.raises(StoreError, match="format version 5 is newer than this hkv \\(4\\)"):
            opener()
    assert (store_path / "data.mdb").read_bytes() == before


def test_a_format_1_store_is_read_as_is_and_upgraded_when_opened_writable(store_path: Path) -> None:
    keys = keys_for(ids_of(8), 2)
    with DiskTier(store_path, LAYOUT, 64 * REC) as disk:
        disk.put_many(keys, torch.stack([block_for(k) for k in keys]))
    env = raw_env(store_path)  # make it a format-1 store: no refs / summaries, version 1
    with env.begin(write=True) as txn:
        for name in (b"refs", b"summaries"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        meta = env.open_db(b"meta", txn=txn)
        stored = json.loads(txn.get(b"format", db=meta))
        txn.put(b"format", json.dumps({**stored, "format_version": 1}).encode(), db=meta)
    env.close()
    with DiskTier(store_path, LAYOUT, 64 * REC, readonly=True) as disk:
        store = SessionStore(disk)
        assert disk.format_version == 1 and store.names() == [] and store.disk.referenced_keys() == []
        assert store.get("chat") is None and store.verify().ok and len(disk) == len(keys)
    with DiskTier.open_existing(store_path, readonly=False) as disk:
        assert disk.format_version == 2 and disk.has_sessions and disk.layout == LAYOUT
        save(SessionStore(disk), "chat", ids_of(8), kv_tokens=8)
    env = raw_env(store_path)
    with env.begin(db=env.open_db(b"meta")) as txn:
        assert json.loads(txn.get(b"format"))["format_version"] == 2
    env.close()
    with SessionStore.open(store_path) as store:
        assert store.disk.readonly and store.names() == ["chat"] and store.verify().ok


def test_open_existing_reads_the_layout(store_path: Path, tmp_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 64 * REC) as disk:
        save(SessionStore(disk), "chat", ids_of(8), kv_tokens=8)
    with DiskTier.open_existing(store_path) as disk:
        assert disk.layout == LAYOUT and disk.readonly and len(disk) == 2 * LAYERS
        with pytest.raises(TierError, match="read-only"):
            SessionStore(disk).lock("chat")
    with SessionStore.open(store_path, readonly=False) as store:
        store.delete("chat")
        assert len(store.disk) == 0
    with pytest.raises(StoreError, match="no data.mdb"):
        DiskTier.open_existing(tmp_path / "nothing")


def test_reclaim_is_all_or_nothing(store: SessionStore) -> None:
    """Issue 16 (8): dropping sessions' KV that cannot free what is needed would lose data for
    nothing: such a reclaim changes nothing."""
    save(store, "old", ids_of(11, 1000), kv_tokens=10)
    save(store, "new", ids_of(11, 2000), kv_tokens=10)
    used = store.disk.used_bytes()
    result = store.reclaim(used + 1, skip=set(), in_use=lambda key: False)
    assert result.sessions == [] and result.freed_bytes == 0 and store.disk.used_bytes() == used
    assert store.get("old").kv_tokens == 10 and store.get("new").kv_tokens == 10
    assert store.reclaim(used, skip=set(), in_use=lambda key: False).sessions == ["old", "new"]
