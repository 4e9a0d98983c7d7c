"""Persistent sessions on tiny random models (fast): resume in a new runtime equals one
uninterrupted conversation (and DynamicCache), identity and layout checks, corrupt blocks,
shared prefixes stored once, prefix reuse without a session, names and locks; the resume with the
device tier on a CUDA GPU (skipped without one)."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
import torch

from hkv import Config, wrap
from hkv.blocks import HEADER_SIZE, BlockKey, chain_hashes
from hkv.sessions import (
    CorruptSessionError,
    SessionError,
    SessionLockedError,
    SessionMismatchError,
    SessionNameError,
)
from hkv.errors import TierError

from helpers.models import BLOCK, baseline, block_bytes, prompt
from helpers.records import rewrite

transformers = pytest.importorskip("transformers")

NEW = 10
LAYERS = 2


def _config(model, path, *, block: int = BLOCK, persist: bool = False, reuse: bool = True, mode: str = "exact") -> Config:
    """Exact mode, tiny blocks; device and host hold a few blocks so the KV really moves down."""
    size = block_bytes(model) * block // BLOCK
    return Config(
        tiers={"device": (LAYERS * 3 + 6) * size, "host": 8 * size, "disk": 64 * 2**20, "path": str(path)},
        attention={"mode": mode, "block_tokens": block, "sink_tokens": block, "local_tokens": 2 * block,
                   "budget_tokens": 6 * block, "prefill_chunk_tokens": 64},
        prefetch={"enabled": True, "workers": 2},
        store={"persist": persist, "reuse_prefix": reuse},
    )  # fmt: skip


def _greedy(**kwargs):
    return dict(max_new_tokens=NEW, do_sample=False, **kwargs)


def _baseline(model, ids: torch.Tensor) -> torch.Tensor:
    return baseline(model, ids, NEW)


@pytest.fixture(scope="module")
def model(tiny_lm):
    return tiny_lm("llama", layers=LAYERS)


def _two_turns(model, path, first, second, *, restart: bool, mode: str = "exact"):
    """Greedy replies to two turns in one session; with ``restart`` the runtime is closed (and
    the session committed) between them and the second turn runs in a new runtime."""
    config = _config(model, path, mode=mode)
    rt = wrap(model, config)
    try:
        s = rt.session("chat")
        out1 = s.generate(first, **_greedy())
        if restart:
            rt.close()
            rt = wrap(model, config)
            s = rt.session("chat")
            report = s.restored
            assert not report.new and report.tokens == out1.shape[1]
            assert report.kv_tokens == out1.shape[1] - 1 and report.pending_tokens == 0
            assert report.adopted_blocks == report.kv_tokens // BLOCK and report.tail_tokens == report.kv_tokens % BLOCK
            # lazy: only the pinned sink / local blocks were read
            read = rt.stats().moved_bytes.get("disk->host", 0)
            assert read <= LAYERS * 3 * block_bytes(model)
        out2 = s.generate(second, **_greedy())
        s.close()
        return out1, out2
    finally:
        rt.close()


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_resume_in_new_runtime_matches_uninterrupted_and_dynamic_cache(model, tmp_path, mode):
    first, second = prompt(150, seed=1), prompt(40, seed=2)
    a1, a2 = _two_turns(model, tmp_path / "a", first, second, restart=False, mode=mode)
    b1, b2 = _two_turns(model, tmp_path / "b", first, second, restart=True, mode=mode)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    if mode == "exact":
        assert a2.shape[1] == first.shape[1] + second.shape[1] + 2 * NEW
        assert torch.equal(a1, _baseline(model, first))
        assert torch.equal(a2, _baseline(model, torch.cat([a1, second], dim=1)))


def test_append_then_generate_and_resume_twice(model, tmp_path):
    config = _config(model, tmp_path / "s")
    doc, question = prompt(100, seed=3), prompt(7, seed=4)
    with wrap(model, config) as rt:
        with rt.session("doc") as s:
            s.append(doc)
            assert s.kv_tokens == 99 and s.tokens.shape == (100,)
    with wrap(model, config) as rt:
        with rt.session("doc") as s:
            assert s.restored.kv_tokens == 99
            out = s.generate(question, **_greedy())
            info = s.info()
            assert info.tokens == 107 + NEW and info.kv_tokens == 106 + NEW and info.missing_blocks == 0
    assert torch.equal(out, _baseline(model, torch.cat([doc, question], dim=1)))


def test_resume_when_the_stored_kv_ends_on_a_block_boundary(model, tmp_path):
    config = _config(model, tmp_path / "s")
    doc, question = prompt(8 * BLOCK + 1, seed=5), prompt(9, seed=6)  # KV of 8 whole blocks, no tail
    with wrap(model, config) as rt, rt.session("edge") as s:
        s.append(doc)
    with wrap(model, config) as rt, rt.session("edge") as s:
        r = s.restored
        assert (r.kv_tokens, r.adopted_blocks, r.tail_tokens, r.pending_tokens) == (8 * BLOCK, 8, 0, 0)
        out = s.generate(question, **_greedy())
    assert torch.equal(out, _baseline(model, torch.cat([doc, question], dim=1)))


def test_a_resume_pins_every_layers_sink_and_local_blocks_in_one_read(model, tmp_path, monkeypatch):
    """One ``pin`` call (one batch of disk reads) for all layers, not one per layer; the blocks
    are on the device and the resumed generation is the model's own."""
    from hkv.tiers.manager import TierManager

    config = _config(model, tmp_path / "s")
    doc, question = prompt(10 * BLOCK + 3, seed=8), prompt(5, seed=9)
    with wrap(model, config) as rt, rt.session("pins") as s:
        s.append(doc)
    calls: list[list[BlockKey]] = []
    pin = TierManager.pin
    monkeypatch.setattr(TierManager, "pin", lambda self, keys: (calls.append(list(keys)), pin(self, keys))[1])
    with wrap(model, config) as rt, rt.session("pins") as s:
        assert s.restored.adopted_blocks == 10
        assert len(calls) == 1
        sequence = s._cache.sequence  # the session's cache
        sink_local = {0} | set(range(10 - config.attention.local_tokens // BLOCK, 10))
        assert sorted(calls[0]) == sorted(sequence._keys[layer][i] for layer in range(LAYERS) for i in sink_local)
        assert all(sequence.manager.where(key) >= {"device"} for key in calls[0])
        out = s.generate(question, **_greedy())
    assert torch.equal(out, _baseline(model, torch.cat([doc, question], dim=1)))


def test_no_stored_block_is_adopted_when_noted_ids_run_ahead_of_the_kv(model, tmp_path):
    from hkv.attention.prefix import adopt_stored_prefix

    ids = prompt(4 * BLOCK + 1, seed=7)
    config = _config(model, tmp_path / "s")
    with wrap(model, config) as rt:
        with rt.session("p") as s:
            s.append(ids)
        with rt.new_cache() as cache:
            cache.sequence.note_tokens(ids[0, :3])  # noted, never appended: chains would hash the wrong tokens
            assert cache.sequence.prefix_chain() is None
            assert adopt_stored_prefix(cache.sequence, ids[0, :-1]) == 0  # stored, but not what was noted
            assert cache.sequence.sealed_blocks() == 0
        with rt.new_cache() as cache:
            assert adopt_stored_prefix(cache.sequence, ids[0, :-1]) == 4 * BLOCK


def test_kv_of_other_attention_settings_is_refused_and_never_reused(model, tmp_path):
    """Sparse-mode KV is not the model's own KV after the first layer: resuming it in exact mode
    is refused naming the attention settings, and exact prefix reuse never adopts it."""
    doc = prompt(150, seed=7)
    with wrap(model, _config(model, tmp_path / "s", mode="sparse", persist=True)) as rt, rt.session("mixed") as s:
        s.append(doc)
    with wrap(model, _config(model, tmp_path / "s", mode="exact", persist=True)) as rt:
        with pytest.raises(SessionMismatchError, match="attention: stored sparse .* this model exact"):
            rt.session("mixed")
        out = rt.generate(doc, **_greedy())
        assert rt.stats().extra.get("reused_tokens", 0) == 0
    assert torch.equal(out, _baseline(model, doc))


def test_foreign_model_is_refused_naming_the_weights(model, tiny_lm, tmp_path):
    config = _config(model, tmp_path / "s")
    with wrap(model, config) as rt, rt.session("mine") as s:
        s.append(prompt(60))
    other = tiny_lm("llama", layers=LAYERS, seed=5)  # same shapes, other weights
    with wrap(other, config) as rt:
        with pytest.raises(SessionMismatchError, match="weights_sample") as caught:
            rt.session("mine")
        assert "mine" in str(caught.value) and "fingerprint" in str(caught.value)
        assert not rt.open_sessions
    with wrap(model, config) as rt, rt.session("mine") as s:  # nothing was damaged
        assert s.restored.kv_tokens == 59


def test_changed_block_size_is_refused_naming_block_tokens(model, tmp_path):
    with wrap(model, _config(model, tmp_path / "s")) as rt, rt.session("chat") as s:
        s.append(prompt(60))
    with pytest.raises(TierError, match="block_tokens"):
        with wrap(model, _config(model, tmp_path / "s", block=2 * BLOCK)) as rt:
            rt.session("chat")


def _flip_block(path, key: BlockKey, offset: int = 17) -> None:
    def change(record: bytearray) -> bytearray:
        record[HEADER_SIZE + offset] ^= 0xFF
        return record

    rewrite(path, b"blocks", bytes(key), change)  # in its segment file, or in LMDB


def test_flipped_bytes_in_a_block_are_reported_and_other_sessions_work(model, tmp_path):
    config = _config(model, tmp_path / "s")
    a_ids, b_ids = prompt(150, seed=7), prompt(90, seed=8)
    with wrap(model, config) as rt:
        with rt.session("a") as s:
            s.append(a_ids)
        with rt.session("b") as s:
            s.append(b_ids)
        fingerprint = rt.fingerprint
    victim = BlockKey.make(fingerprint, chain_hashes(a_ids[0], BLOCK)[3], 1)  # neither sink nor local: not read at open
    _flip_block(tmp_path / "s", victim)
    with wrap(model, config) as rt:
        report = rt.session_store().verify()
        assert report.problems["a"] and not report.problems["b"]
        assert any(victim.hex() in line for line in report.problems["a"])
        s = rt.session("a")
        with pytest.raises(CorruptSessionError) as caught:
            s.generate(prompt(5, seed=9), **_greedy())
        assert victim.hex() in str(caught.value)
        with pytest.raises(SessionError, match="reopen"):
            s.generate(prompt(5, seed=9), **_greedy())
        s.close()
        with rt.session("b") as s:
            out = s.generate(prompt(5, seed=9), **_greedy())
    assert torch.equal(out, _baseline(model, torch.cat([b_ids, prompt(5, seed=9)], dim=1)))


def test_a_corrupt_block_read_at_open_names_the_session(model, tmp_path):
    config = _config(model, tmp_path / "s")
    ids = prompt(150, seed=7)
    with wrap(model, config) as rt:
        with rt.session("a") as s:
            s.append(ids)
        fingerprint = rt.fingerprint
    _flip_block(tmp_path / "s", BlockKey.make(fingerprint, chain_hashes(ids[0], BLOCK)[0], 1))  # a sink block: read at open
    with wrap(model, config) as rt:
        for _ in range(2):  # the lock was released: the second open fails the same way
            with pytest.raises(CorruptSessionError, match="'a'"):
                rt.session("a")
        assert not rt.open_sessions
        with rt.session("b") as s:
            s.append(prompt(20, seed=1))


def test_shared_prefix_is_stored_once(model, tmp_path):
    prefix = prompt(8 * BLOCK, seed=11)  # 8 whole blocks
    x_ids = torch.cat([prefix, prompt(40, seed=12)], dim=1)
    y_ids = torch.cat([prefix, prompt(50, seed=13)], dim=1)
    config = _config(model, tmp_path / "s", reuse=False)  # both compute the prefix: still stored once
    with wrap(model, config) as rt:
        with rt.session("x") as s:
            s.append(x_ids)
        with rt.session("y") as s:
            s.append(y_ids)
        store = rt.session_store()
        chains = chain_hashes(prefix[0], BLOCK)
        shared = [BlockKey.make(rt.fingerprint, c, layer) for c in chains for layer in range(LAYERS)]
        assert store.disk.refs(shared) == [2] * len(shared)
        own = {name: (ids.shape[1] - 1) // BLOCK - len(chains) for name, ids in (("x", x_ids), ("y", y_ids))}
        expected = LAYERS * (len(chains) + own["x"] + own["y"])
        assert rt.manager.stats().tiers["disk"].blocks == expected
        assert store.info("x").shared_blocks == LAYERS * len(chains)
        store.delete("x")
        assert store.disk.refs(shared) == [1] * len(shared)
    with wrap(model, config) as rt, rt.session("y") as s:
        assert s.restored.kv_tokens == y_ids.shape[1] - 1
        out = s.generate(prompt(3, seed=14), **_greedy())
    assert torch.equal(out, _baseline(model, torch.cat([y_ids, prompt(3, seed=14)], dim=1)))


def test_new_session_reuses_a_stored_prefix(model, tmp_path):
    prefix = prompt(8 * BLOCK, seed=21)
    config = _config(model, tmp_path / "s")
    with wrap(model, config) as rt:
        with rt.session("first") as s:
            s.append(torch.cat([prefix, prompt(20, seed=22)], dim=1))
        question = torch.cat([prefix, prompt(30, seed=23)], dim=1)
        before = rt.stats()
        with rt.session("second") as s:
            out = s.generate(question, **_greedy())
        after = rt.stats()
        assert after.extra["reused_tokens"] - before.extra["reused_tokens"] == 8 * BLOCK
        assert after.prompt_tokens - before.prompt_tokens == question.shape[1] - 1 - 8 * BLOCK
    assert torch.equal(out, _baseline(model, question))


def test_generate_reuses_a_stored_prefix_without_a_session(model, tmp_path):
    ids = prompt(200, seed=31)
    expected = _baseline(model, ids)
    config = _config(model, tmp_path / "s", persist=True)
    with wrap(model, config) as rt:
        assert torch.equal(rt.generate(ids, **_greedy()), expected)
        first = rt.stats()
        assert first.extra["reused_tokens"] == 0 and first.prompt_tokens == 199
    with wrap(model, config) as rt:  # a new runtime: the blocks come from the store
        assert torch.equal(rt.generate(ids, **_greedy()), expected)
        second = rt.stats()
        assert second.extra["reused_tokens"] == (199 // BLOCK) * BLOCK
        assert second.prompt_tokens == 199 - second.extra["reused_tokens"]
    other = torch.cat([ids[:, :100], prompt(50, seed=32)], dim=1)  # shares 6 whole blocks
    with wrap(model, config) as rt:
        assert torch.equal(rt.generate(other, **_greedy()), _baseline(model, other))
        assert rt.stats().extra["reused_tokens"] == 6 * BLOCK


def test_a_block_missing_in_the_middle_of_a_stored_prompt_costs_its_own_tokens(model, tmp_path):
    """Only the missing block is computed (with the stored blocks before it as context); the
    stored blocks after it are adopted, and the tokens are those of an uninterrupted run."""
    ids = prompt(200, seed=33)
    expected = _baseline(model, ids)
    config = _config(model, tmp_path / "s", persist=True)
    with wrap(model, config) as rt:
        rt.generate(ids, **_greedy())
    chains = chain_hashes(ids[0, :199], BLOCK)
    with wrap(model, config) as rt:
        rt.manager.delete([BlockKey.make(rt.fingerprint, chains[5], 1)])  # block 5 of layer 1 only
        assert torch.equal(rt.generate(ids, **_greedy()), expected)
        stats = rt.stats()
    assert stats.extra["reused_tokens"] == (len(chains) - 1) * BLOCK
    assert stats.prompt_tokens == BLOCK + 199 - len(chains) * BLOCK  # the missing block, then the partial tail


def test_blocks_in_the_tiers_without_summaries_are_prefilled_in_chunks(model, tmp_path):
    """Without store.persist a prompt's blocks stay in the device / host tiers with no stored
    summary: a second run of the prompt cannot adopt them and prefills it in whole chunks again
    (not block by block)."""
    ids = prompt(200, seed=34)
    with wrap(model, _config(model, tmp_path / "s")) as rt:
        rt.session_store()  # a store exists
        rt.generate(ids, **_greedy())
        first = rt.stats()
        assert torch.equal(rt.generate(ids, **_greedy()), _baseline(model, ids))
        second = rt.stats()
    assert second.extra["reused_tokens"] == 0
    assert second.forwards - first.forwards == first.forwards  # the same chunks and decode steps


def test_reusing_a_session_prefix_without_persist_keeps_the_session_intact(model, tmp_path):
    ids = prompt(120, seed=41)
    config = _config(model, tmp_path / "s")  # store.persist off: released blocks may lose disk copies
    with wrap(model, config) as rt:
        with rt.session("keep") as s:
            s.append(ids)
        rt.generate(ids, **_greedy())  # adopts the session's blocks, then releases them
        assert rt.stats().extra["reused_tokens"] == (119 // BLOCK) * BLOCK
    with wrap(model, config) as rt:
        assert rt.session_store().verify("keep").ok
        with rt.session("keep") as s:
            assert s.restored.pending_tokens == 0 and s.restored.kv_tokens == 119
            out = s.generate(prompt(4, seed=42), **_greedy())
    assert torch.equal(out, _baseline(model, torch.cat([ids, prompt(4, seed=42)], dim=1)))


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "x" * 129, "sp ace", "é"])
def test_bad_names_are_refused(model, tmp_path, name):
    with wrap(model, _config(model, tmp_path / "s")) as rt:
        with pytest.raises(SessionNameError):
            rt.session(name)
        assert not rt.open_sessions


def test_good_names_and_second_open_is_locked(model, tmp_path):
    with wrap(model, _config(model, tmp_path / "s")) as rt:
        s = rt.session("Chat-1_v2.0")
        with pytest.raises(SessionLockedError):
            rt.session("Chat-1_v2.0")
        other = rt.session("x" * 128)
        other.close()
        s.close()
        with rt.session("Chat-1_v2.0") as again:  # released by close
            assert again.restored.tokens == 0


def test_runtime_close_commits_open_sessions(model, tmp_path):
    config = _config(model, tmp_path / "s")
    rt = wrap(model, config)
    s = rt.session("open")
    s2 = rt.session("manual", autocommit=False)
    s.append(prompt(40, seed=51))
    s2.append(prompt(40, seed=52))
    rt.close()
    with wrap(model, config) as rt:
        store = rt.session_store()
        assert store.get("open").kv_tokens == 39
        assert store.get("manual") is None  # never committed
        with rt.session("open") as again:
            assert np.array_equal(again.tokens.numpy(), prompt(40, seed=51)[0].numpy())


def test_disk_budget_drops_least_recently_used_sessions_kv(model, tmp_path):
    record = 64 + block_bytes(model)
    path = tmp_path / "s"
    config = Config.load(_config(model, path), tiers={"disk": 45 * record})  # 45 block records
    old_ids, new_ids = prompt(150, seed=61), prompt(300, seed=62)  # 9 and 18 blocks per layer
    with wrap(model, config) as rt:
        with rt.session("old") as s:
            s.append(old_ids)
        with rt.session("new") as s:  # needs 36 records: "old" (18) must give way
            s.append(new_ids)
            assert s.kv_tokens == 299
        store = rt.session_store()
        assert store.get("old").kv_tokens == 0 and len(store.get("old").token_ids) == 150
        assert store.get("new").kv_tokens == 299
        assert store.verify().ok
    with wrap(model, config) as rt:
        with pytest.raises(TierError, match="disk"):  # "new" is open: its KV is not reclaimed, nothing is left to drop
            with rt.session("new"), rt.session("third") as t:
                t.append(prompt(200, seed=63))
    with wrap(model, config) as rt, rt.session("old") as s:  # its tokens survive; the KV is recomputed
        assert s.restored.kv_tokens == 0 and s.restored.pending_tokens == 149
        out = s.generate(prompt(4, seed=64), **_greedy())
    assert torch.equal(out, _baseline(model, torch.cat([old_ids, prompt(4, seed=64)], dim=1)))


def test_remap_sessions_never_score_with_stored_frame_summaries(model, tmp_path):
    """positions = "remap" scores blocks with summaries of the keys rotated back to each block's
    start, filed under ``block key + b"r"``; a store whose remap blocks carry only stored-frame
    summaries (as written before the relative frame existed) must not have them used: the
    session adopts no block, prefills its KV again from its tokens, and commits the relative ones."""
    path = tmp_path / "s"
    config = Config.load(_config(model, path, mode="sparse"), attention={"positions": "remap"}, env={})
    with wrap(model, config) as rt, rt.session("chat") as s:
        s.append(prompt(150, seed=71))
    env = lmdb.open(str(path), max_dbs=16, map_size=2**30, subdir=True)
    with env.begin(write=True) as txn:  # turn every relative summary into a stored-frame one
        summaries = env.open_db(b"summaries", txn=txn, create=False)
        relative = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=summaries) if len(k) == 17 and k.endswith(b"r")]
        assert relative, "a remap session stores relative-frame summaries"
        for key, value in relative:
            txn.delete(key, db=summaries)
            txn.put(key[:16], value, db=summaries)
        sessions = env.open_db(b"sessions", txn=txn, create=False)  # such a store had no summary runs either
        runs = [bytes(k) for k in txn.cursor(db=sessions).iternext(values=False) if bytes(k).startswith(b"u:")]
        assert runs, "a session commit writes summary runs"
        for key in runs:
            txn.delete(key, db=sessions)
    env.close()
    with wrap(model, config) as rt:
        with rt.session("chat") as s:
            assert s.restored.tokens == 150 and s.restored.adopted_blocks == 0 and s.restored.pending_tokens == 149
            s.append(prompt(20, seed=72))  # prefills the pending KV, then the new turn
        with rt.session("chat") as s:
            assert s.restored.tokens == 170 and s.restored.adopted_blocks > 0


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; run by scripts/gpu_check.sh)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_session_resumes_on_cuda(tiny_lm, tmp_path, mode):
    """A conversation committed by a runtime whose blocks live in HBM and pinned host memory
    resumes in a new runtime with the same greedy tokens as one uninterrupted session (and as
    DynamicCache, in exact mode)."""
    model = tiny_lm("llama", layers=LAYERS).to("cuda")
    first, second = prompt(150, seed=1).to("cuda"), prompt(40, seed=2).to("cuda")
    a1, a2 = _two_turns(model, tmp_path / "a", first, second, restart=False, mode=mode)
    b1, b2 = _two_turns(model, tmp_path / "b", first, second, restart=True, mode=mode)
    assert torch.equal(a1.cpu(), b1.cpu()) and torch.equal(a2.cpu(), b2.cpu())
    if mode == "exact":
        assert a2.shape[1] == first.shape[1] + second.shape[1] + 2 * NEW
        assert torch.equal(a1.cpu(), _baseline(model, first).cpu())
        assert torch.equal(a2.cpu(), _baseline(model, torch.cat([a1, second], dim=1)).cpu())
