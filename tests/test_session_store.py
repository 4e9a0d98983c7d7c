"""Session records in the LMDB store (format 2): records, refs, commit / delete / reclaim, verify,
format upgrade, locks across processes, and the tier manager's view of stored blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from hkv.blocks import HEADER_SIZE, BlockKey, BlockLayout, chain_hashes
from hkv.config import Config
from hkv.errors import TierError, TierFullError
from hkv.errors import StoreError
from hkv.store.block_store import STORE_VERSION
from hkv.tiers.disk import DiskTier
from hkv.tiers.manager import TierManager
from hkv.sessions.records import (
    CorruptSessionError,
    ModelIdentity,
    SessionError,
    SessionLockedError,
    SessionNameError,
    SessionNotFoundError,
    SessionRecord,
    check_name,
)
from hkv.sessions.store import SessionStore
from hkv.store.summary_rows import SummaryRows
from hkv.store.txn import CommitResult

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
REC = LAYOUT.record_nbytes
LAYERS = 2
FP = bytes(range(16))


def identity(fingerprint: bytes = FP, **changes: object) -> ModelIdentity:
    description = {"class": "TinyLM", "model_type": "tiny", "num_layers": LAYERS, "num_q_heads": 4, "num_kv_heads": 2,
                   "head_dim": 8, "kv_dtype": "float16", **changes}  # fmt: skip
    return ModelIdentity(fingerprint.hex(), description, tokenizer="ab12")


def layout_dict() -> dict[str, object]:
    return {"kv_heads": LAYOUT.kv_heads, "block_tokens": LAYOUT.block_tokens, "head_dim": LAYOUT.head_dim, "dtype": "float16"}


def make_record(name: str, ids, kv_tokens: int) -> SessionRecord:
    bt = LAYOUT.block_tokens
    return SessionRecord(name, identity(), layout_dict(), np.asarray(ids, dtype=np.int64), kv_tokens=kv_tokens,
                         kv_blocks=kv_tokens // bt, tail_tokens=kv_tokens % bt)  # fmt: skip


def keys_for(ids, kv_blocks: int) -> list[BlockKey]:
    """Block-major keys, as BlockKey.make computes them."""
    chains = chain_hashes(np.asarray(ids)[: kv_blocks * LAYOUT.block_tokens], LAYOUT.block_tokens)
    return [BlockKey.make(FP, chain, layer) for chain in chains for layer in range(LAYERS)]


def block_for(key: BlockKey) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int.from_bytes(bytes(key)[:7], "little"))
    return torch.randn(LAYOUT.shape, generator=gen).to(LAYOUT.dtype)


def summary_for(key: BlockKey) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int.from_bytes(bytes(key)[7:14], "little"))
    return torch.randn(2, LAYOUT.kv_heads, LAYOUT.head_dim, generator=gen)


def tail_for(name: str, tail_tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(len(name) * 1000 + tail_tokens)
    return torch.randn(LAYERS, 2, LAYOUT.kv_heads, tail_tokens, LAYOUT.head_dim, generator=gen).to(LAYOUT.dtype)


def save(store: SessionStore, name: str, ids, kv_tokens: int) -> tuple[SessionRecord, CommitResult]:
    """Write the session's missing blocks, then commit it with summaries and tail."""
    record = make_record(name, ids, kv_tokens)
    keys = keys_for(ids, record.kv_blocks)
    absent = [key for key in dict.fromkeys(keys) if not store.disk.contains(key)]
    if absent:
        store.disk.put_many(absent, torch.stack([block_for(key) for key in absent]))
    summaries = torch.stack([summary_for(key) for key in keys]) if keys else None
    tail = tail_for(name, record.tail_tokens) if record.tail_tokens else None
    return record, store.commit(record, block_keys=keys, summaries=summaries, summary_keys=keys, tail=tail)


def ids_of(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(path: Path):
    disk = DiskTier(path, LAYOUT, 64 * REC, writer_batch=8)
    yield SessionStore(disk)
    disk.close()


def raw_env(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), max_dbs=8, map_size=1 << 26)


def rewrite(path: Path, db: bytes, key: bytes, change) -> None:
    """Change one stored value by hand (the store must be closed in this process)."""
    env = raw_env(path)
    handle = env.open_db(db)
    with env.begin(write=True, db=handle) as txn:
        txn.put(key, bytes(change(bytearray(txn.get(key)))))
    env.close()


def flip(offset: int):
    def change(value: bytearray) -> bytearray:
        value[offset] ^= 0x40
        return value

    return change


# -- records and names ----------------------------------------------------------------------------


def test_record_round_trip_and_its_errors() -> None:
    record = make_record("chat", [5, 2**40, -3, 7, 1], kv_tokens=4)  # an id outside int32: stored as int64
    record.created, record.updated, record.last_used, record.commits = 1.5, 2.5, 3.5, 7
    data = record.to_bytes()
    back = SessionRecord.from_bytes("chat", data)
    assert back.token_ids.dtype == np.int64 and back.token_ids.tolist() == [5, 2**40, -3, 7, 1]
    assert (back.identity, back.layout, back.kv_tokens, back.kv_blocks, back.tail_tokens) == (
        record.identity, record.layout, 4, 1, 0
    )  # fmt: skip
    assert (back.created, back.updated, back.last_used, back.commits) == (1.5, 2.5, 3.5, 7)
    small = make_record("chat", ids_of(9), kv_tokens=9).to_bytes()
    assert len(small) < len(make_record("chat", ids_of(9) + 2**40, kv_tokens=9).to_bytes())  # int32 when it fits
    assert SessionRecord.from_bytes("chat", small).token_ids.tolist() == list(range(9))
    assert [bytes(k) for k in keys_for(ids_of(9), 2)] == make_record("x", ids_of(9), 9).key_digests()

    with pytest.raises(CorruptSessionError, match="'chat'.*checksum"):
        SessionRecord.from_bytes("chat", bytes(flip(10)(bytearray(data))))
    with pytest.raises(CorruptSessionError, match="'chat'.*checksum"):
        SessionRecord.from_bytes("chat", data[:-20])
    with pytest.raises(CorruptSessionError, match="truncated"):
        SessionRecord.from_bytes("chat", data[:5])
    with pytest.raises(CorruptSessionError, match="record is of session 'chat'"):
        SessionRecord.from_bytes("other", data)
    newer = make_record("chat", ids_of(4), 4)
    newer.version = 2
    with pytest.raises(SessionError, match="record version 2 is newer") as caught:
        SessionRecord.from_bytes("chat", newer.to_bytes())
    assert not isinstance(caught.value, CorruptSessionError)


def test_identity_differences_name_each_field() -> None:
    stored = identity()
    assert stored.differences(identity()) == []
    other = identity(bytes(16), num_layers=3)
    other.tokenizer = "ffff"
    lines = stored.differences(other)
    assert "num_layers: stored 2, this model 3" in lines
    assert "tokenizer: stored ab12, this model ffff" in lines
    assert any(line.startswith("fingerprint: stored 000102") for line in lines)
    other = identity()
    other.tokenizer = None  # unknown on one side: not a difference
    assert stored.differences(other) == []


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), ("a" * 129, "129 characters"), (".hidden", "starts with '.'"), ("a/b", "'/'"), ("../x", "'/'"),
     ("caf\u00e9", "'\u00e9'"), ("two words", "' '"), ("nul\x00", "'\\\\x00'"), (7, "must be a string")],
)  # fmt: skip
def test_bad_names_are_refused_with_the_reason(name, why) -> None:
    with pytest.raises(SessionNameError, match=why):
        check_name(name)


def test_good_names() -> None:
    for name in ("a", "chat-1.v2_x", "A" * 128, "-x", "_"):
        assert check_name(name) == name


# -- commit, refs, delete -----------------------------------------------------------------------


def test_commit_then_get_in_a_new_disk_tier(path: Path) -> None:
    ids = ids_of(11)  # 2 blocks of 4 + a 2-token tail, one token whose KV is not computed
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
        record, result = save(SessionStore(disk), "chat", np.append(ids, 99), kv_tokens=10)
        assert len(result.newly_referenced) == 2 * LAYERS and result.deleted == []
        assert record.commits == 1 and record.created == record.updated == record.last_used > 0
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
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


def test_verify_names_each_damaged_session_and_the_others_stay_usable(path: Path) -> None:
    _corrupt_store(path)
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
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


def test_a_future_store_version_is_refused_untouched(path: Path) -> None:
    DiskTier(path, LAYOUT, 8 * REC).close()
    env = raw_env(path)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        stored = json.loads(txn.get(b"format"))
        assert stored["format_version"] == STORE_VERSION == 2
        txn.put(b"format", json.dumps({**stored, "format_version": 3}).encode())
    env.close()
    before = (path / "data.mdb").read_bytes()
    for opener in (lambda: DiskTier(path, LAYOUT, 8 * REC), lambda: DiskTier.open_existing(path, readonly=False),
                   lambda: SessionStore.open(path)):  # fmt: skip
        with pytest.raises(StoreError, match="format version 3 is newer than this hkv \\(2\\)"):
            opener()
    assert (path / "data.mdb").read_bytes() == before


def test_a_format_1_store_is_read_as_is_and_upgraded_when_opened_writable(path: Path) -> None:
    keys = keys_for(ids_of(8), 2)
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
        disk.put_many(keys, torch.stack([block_for(k) for k in keys]))
    env = raw_env(path)  # make it a format-1 store: no refs / summaries, version 1
    with env.begin(write=True) as txn:
        for name in (b"refs", b"summaries"):
            txn.drop(env.open_db(name, txn=txn), delete=True)
        meta = env.open_db(b"meta", txn=txn)
        stored = json.loads(txn.get(b"format", db=meta))
        txn.put(b"format", json.dumps({**stored, "format_version": 1}).encode(), db=meta)
    env.close()
    with DiskTier(path, LAYOUT, 64 * REC, readonly=True) as disk:
        store = SessionStore(disk)
        assert disk.format_version == 1 and store.names() == [] and store.disk.referenced_keys() == []
        assert store.get("chat") is None and store.verify().ok and len(disk) == len(keys)
    with DiskTier.open_existing(path, readonly=False) as disk:
        assert disk.format_version == 2 and disk.has_sessions and disk.layout == LAYOUT
        save(SessionStore(disk), "chat", ids_of(8), kv_tokens=8)
    env = raw_env(path)
    with env.begin(db=env.open_db(b"meta")) as txn:
        assert json.loads(txn.get(b"format"))["format_version"] == 2
    env.close()
    with SessionStore.open(path) as store:
        assert store.disk.readonly and store.names() == ["chat"] and store.verify().ok


def test_open_existing_reads_the_layout(path: Path, tmp_path: Path) -> None:
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
        save(SessionStore(disk), "chat", ids_of(8), kv_tokens=8)
    with DiskTier.open_existing(path) as disk:
        assert disk.layout == LAYOUT and disk.readonly and len(disk) == 2 * LAYERS
        with pytest.raises(TierError, match="read-only"):
            SessionStore(disk).lock("chat")
    with SessionStore.open(path, readonly=False) as store:
        store.delete("chat")
        assert len(store.disk) == 0
    with pytest.raises(StoreError, match="no data.mdb"):
        DiskTier.open_existing(tmp_path / "nothing")


# -- locks ----------------------------------------------------------------------------------------

_HOLDER = """
import fcntl, os, sys, time, xxhash
fd = os.open(os.path.join(sys.argv[1], "sessions.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, xxhash.xxh3_64_intdigest(sys.argv[2].encode()) & (2**62 - 1))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_refuses_until_it_dies(store: SessionStore) -> None:
    save(store, "chat", ids_of(8), kv_tokens=8)
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store.path), "chat"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert store.is_locked("chat") and not store.is_locked("other")
        with pytest.raises(SessionLockedError, match="'chat'"):
            store.lock("chat")
        with pytest.raises(SessionLockedError, match="another process"):
            store.delete("chat")
        assert store.names() == ["chat"]
        with store.lock("other"):  # another name: another byte
            assert store.is_locked("other")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert not store.is_locked("chat")
        lock = store.lock("chat")
    finally:
        child.kill()
        child.wait(10)
    with pytest.raises(SessionLockedError):  # a second open in this process
        SessionStore(store.disk).lock("chat")
    lock.release()
    lock.release()  # idempotent
    assert not store.is_locked("chat")
    store.lock("chat").release()
    store.delete("chat")


_PROBE = """
import fcntl, os, sys, xxhash
fd = os.open(os.path.join(sys.argv[1], "sessions.lock"), os.O_RDWR | os.O_CREAT, 0o644)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, xxhash.xxh3_64_intdigest(sys.argv[2].encode()) & (2**62 - 1))
    print("locked")
except OSError:
    print("refused")
"""


def _probe(store: SessionStore, name: str) -> str:
    """Whether another process could take ``name``'s writer lock now."""
    child = subprocess.run([sys.executable, "-c", _PROBE, str(store.path), name], capture_output=True, text=True, timeout=60)
    return child.stdout.strip()


def _queued(store: SessionStore, n: int) -> None:
    """Wait until the writer's queue holds ``n`` jobs."""
    for _ in range(1000):
        if store.disk._writer._jobs.qsize() == n:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the job was not queued")


def test_delete_and_reclaim_hold_the_writer_lock_until_their_transaction_is_done(store: SessionStore) -> None:
    """Else another process could open the session (reading the old record) between the lock
    check and the commit, and then use blocks the delete / reclaim frees."""
    save(store, "chat", ids_of(8), kv_tokens=8)
    save(store, "old", ids_of(8, 100), kv_tokens=8)
    for call, name in [(lambda: store.delete("chat"), "chat"), (lambda: store.reclaim(1, skip=set(), in_use=lambda k: False), "old")]:
        first, second = threading.Event(), threading.Event()
        blocker = store.disk.submit_apply(lambda txn: first.wait(30))
        _queued(store, 0)
        results: list[object] = []
        worker = threading.Thread(target=lambda: results.append(call()))
        worker.start()
        _queued(store, 1)
        after = store.disk.submit_apply(lambda txn: second.wait(30))  # in the batch of the call's job
        first.set()
        _queued(store, 0)  # the writer took the call's job and `after` in one batch
        threading.Event().wait(0.5)  # the call's job has run; its transaction waits for `after`
        try:
            assert _probe(store, name) == "refused"
        finally:
            second.set()
            worker.join(30)
            blocker.result(), after.result()
        assert results and _probe(store, name) == "locked" and not store.is_locked(name)
    assert store.names() == ["old"] and store.get("old").kv_tokens == 0


# -- the tier manager -----------------------------------------------------------------------------


def manager_for(path: Path, disk_blocks: int, **store_config: object) -> TierManager:
    config = Config(tiers={"device": LAYOUT.nbytes, "host": LAYOUT.nbytes, "disk": disk_blocks * REC, "path": str(path)},
                    store=store_config)  # fmt: skip
    return TierManager(config, LAYOUT, device="cpu")


def put_session(manager: TierManager, name: str, ids, kv_tokens: int) -> list[BlockKey]:
    """As the session layer does: write through, commit, tell the manager."""
    record = make_record(name, ids, kv_tokens)
    keys = keys_for(ids, record.kv_blocks)
    manager.put_many(keys, torch.stack([block_for(k) for k in keys]), persist=True)
    summaries = torch.stack([summary_for(k) for k in keys])
    manager.apply_store_changes(SessionStore(manager.store).commit(record, block_keys=keys, summaries=summaries, summary_keys=keys, tail=None))
    return keys


def filler(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def test_stored_blocks_survive_disk_pressure_and_the_reclaimer_frees_room(path: Path) -> None:
    with manager_for(path, disk_blocks=8) as manager:
        keys = put_session(manager, "chat", ids_of(8), kv_tokens=8)  # 4 records on disk
        manager.retain(keys)
        manager.release(keys)  # no store.persist: a spilled copy would go, a stored one stays
        assert all("disk" in manager.where(k) for k in keys)
        for i in range(12):  # each put spills older fillers to disk and evicts
            manager.put(filler(i), block_for(filler(i)))
        assert all("disk" in manager.where(k) for k in keys) and SummaryRows(manager.store).present(keys) == len(keys)
        assert manager.stats().evictions["disk"] > 0 and manager.stats().tiers["disk"].blocks <= 8
        manager.retain([filler(i) for i in range(12) if manager.contains(filler(i))])
        new = [filler(i) for i in range(100, 104)]  # 6 referenced + 4 new = every slot of the three tiers
        with pytest.raises(TierFullError):  # everything else is referenced, no reclaimer
            manager.put_many(new, torch.stack([block_for(k) for k in new]))
        calls: list[int] = []

        def reclaimer(need: int) -> CommitResult:
            calls.append(need)
            return SessionStore(manager.store).reclaim(need, skip=set(), in_use=manager.in_use)

        manager.set_reclaimer(reclaimer)
        manager.put_many(new, torch.stack([block_for(k) for k in new]))
        assert all(torch.equal(manager.read(k), block_for(k)) for k in new)
        assert calls and calls[0] % REC == 0 and SessionStore(manager.store).get("chat").kv_tokens == 0
        assert not any(manager.contains(k) for k in keys) and manager.stats().tiers["disk"].blocks <= 8
        assert SessionStore(manager.store).get("chat").token_ids.tolist() == list(range(8))


def test_a_manager_reopened_knows_its_stored_blocks(path: Path) -> None:
    with manager_for(path, disk_blocks=8) as manager:
        keys = put_session(manager, "chat", ids_of(8), kv_tokens=8)
    with manager_for(path, disk_blocks=8) as manager:
        assert all(manager._entries[k.digest].stored for k in keys)
        assert not manager.in_use(keys[0].digest)
        manager.retain(keys[:1])
        assert manager.in_use(keys[0].digest)
        manager.release(keys[:1])
        manager.apply_store_changes(SessionStore(manager.store).delete("chat", in_use=manager.in_use))
        assert not any(manager.contains(k) for k in keys) and manager.stats().tiers["disk"].blocks == 0


_COMMITTER = textwrap.dedent(f"""
    import sys, numpy as np, torch
    from hkv.blocks import BlockKey, chain_hashes
    from hkv.sessions.records import ModelIdentity, SessionRecord
    from hkv.sessions.store import SessionStore
    ids = np.arange(8, dtype=np.int64)
    identity = ModelIdentity({FP.hex()!r}, {identity().description!r}, "ab12")
    record = SessionRecord("chat", identity, {layout_dict()!r}, ids, kv_tokens=8, kv_blocks=2)
    keys = [BlockKey(k) for k in record.key_digests()]
    with SessionStore.open(sys.argv[1], readonly=False) as store:
        store.commit(record, block_keys=keys, summaries=None, summary_keys=[], tail=None)
    print("committed", flush=True)
""")


def test_a_stale_view_in_another_process_cannot_evict_a_committed_session(path: Path) -> None:
    with manager_for(path, disk_blocks=8) as manager:
        keys = keys_for(ids_of(8), 2)
        manager.put_many(keys, torch.stack([block_for(k) for k in keys]), persist=True)  # unreferenced here
        manager.flush()
        manager.close()  # one LMDB environment per process: let the child commit, then reopen
    with manager_for(path, disk_blocks=8) as manager:
        assert not manager._entries[keys[0].digest].stored
        child = subprocess.run([sys.executable, "-c", _COMMITTER, str(path)], capture_output=True, text=True, timeout=60)
        assert child.returncode == 0 and child.stdout.strip() == "committed", child.stderr
        for i in range(12):  # the manager's view says keys are evictable; the store keeps them
            manager.put(filler(i), block_for(filler(i)))
        assert all(manager._entries[k.digest].stored and "disk" in manager.where(k) for k in keys)
        assert manager.store.refs(keys) == [1] * len(keys)
        assert manager.stats().tiers["disk"].blocks <= 8 and SessionStore(manager.store).verify("chat").problems["chat"] == [
            f"session 'chat': block {i // LAYERS} layer {i % LAYERS} ({bytes(k).hex()}): summary missing or corrupt"
            for i, k in enumerate(keys)
        ]


def test_a_failed_spill_to_disk_stores_nothing_of_the_batch(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with manager_for(path, disk_blocks=8, persist=True) as manager:
        disk = manager._open_disk()

        def failing(keys, blocks):
            raise TierError("disk write failed")

        monkeypatch.setattr(disk, "put_many", failing)
        before = manager.stats()
        with pytest.raises(TierError, match="disk write failed"):  # 3 blocks: one each on device and host, one only on disk
            manager.put_many([filler(i) for i in range(3)], torch.stack([block_for(filler(i)) for i in range(3)]))
        after = manager.stats()
        assert after.tiers == before.tiers and after.blocks == 0 and not manager.contains(filler(2))
        monkeypatch.undo()
        manager.put_many([filler(i) for i in range(3)], torch.stack([block_for(filler(i)) for i in range(3)]))
        manager.flush()
        assert manager.stats().tiers["disk"].blocks == 3 and all(torch.equal(manager.read(filler(i)), block_for(filler(i))) for i in range(3))


def test_a_known_block_being_moved_up_is_still_written_through(path: Path) -> None:
    """A session commits the blocks it wrote with persist=True; one the prefetcher is promoting
    at that moment must get its disk copy too, else the commit finds it missing."""
    with manager_for(path, disk_blocks=8) as manager:
        key = keys_for(ids_of(4), 1)[0]
        manager.put(key, block_for(key))  # known, no disk copy (no store.persist)
        manager._entries[key.digest].busy = True  # as during a host -> device move
        manager.put_many([key], block_for(key)[None], persist=True)
        manager._entries[key.digest].busy = False
        manager.flush()
        assert "disk" in manager.where(key) and SummaryRows(manager.store).present([key]) == 0 and manager.store.contains(key)


def test_verify_all_reports_refs_fewer_than_the_sessions_using_a_block(path: Path) -> None:
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
        store = SessionStore(disk)
        save(store, "a", ids_of(9), kv_tokens=8)
        save(store, "b", ids_of(13), kv_tokens=12)  # shares a's 2 blocks
        assert store.verify().ok and store.disk.refs(keys_for(ids_of(9), 2)) == [2] * 2 * LAYERS
    shared = bytes(keys_for(ids_of(9), 2)[1])
    rewrite(path, b"refs", shared, lambda value: (1).to_bytes(4, "little"))
    with DiskTier(path, LAYOUT, 64 * REC) as disk:
        report = SessionStore(disk).verify()
        line = f"block 0 layer 1 ({shared.hex()}): has refs 1 but 2 sessions reference it"
        assert report.problems == {"a": [f"session 'a': {line}"], "b": [f"session 'b': {line}"]}
        assert SessionStore(disk).verify("a").ok  # one session alone cannot tell
