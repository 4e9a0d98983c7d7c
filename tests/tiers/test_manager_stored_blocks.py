"""The tier manager's view of blocks that sessions stored (hkv.tiers.manager with the session
store): stored blocks survive disk pressure and the reclaimer frees room, a reopened manager knows
them, a stale view in another process cannot evict them, a failed spill stores nothing, and a
block being moved up is still written through."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hkv.blocks import BlockKey
from hkv.config import Config
from hkv.errors import TierError, TierFullError
from hkv.sessions.store import SessionStore
from hkv.store.summary_rows import SummaryRows
from hkv.store.txn import CommitResult
from hkv.tiers.manager import TierManager

from helpers.records import FP, LAYERS, LAYOUT, REC, block_for, identity, ids_of, keys_for, layout_dict, make_record, summary_for


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


def test_stored_blocks_survive_disk_pressure_and_the_reclaimer_frees_room(store_path: Path) -> None:
    with manager_for(store_path, disk_blocks=8) as manager:
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


def test_a_manager_reopened_knows_its_stored_blocks(store_path: Path) -> None:
    with manager_for(store_path, disk_blocks=8) as manager:
        keys = put_session(manager, "chat", ids_of(8), kv_tokens=8)
    with manager_for(store_path, disk_blocks=8) as manager:
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


def test_a_stale_view_in_another_process_cannot_evict_a_committed_session(store_path: Path) -> None:
    with manager_for(store_path, disk_blocks=8) as manager:
        keys = keys_for(ids_of(8), 2)
        manager.put_many(keys, torch.stack([block_for(k) for k in keys]), persist=True)  # unreferenced here
        manager.flush()
        manager.close()  # one LMDB environment per process: let the child commit, then reopen
    with manager_for(store_path, disk_blocks=8) as manager:
        assert not manager._entries[keys[0].digest].stored
        child = subprocess.run([sys.executable, "-c", _COMMITTER, str(store_path)], capture_output=True, text=True, timeout=60)
        assert child.returncode == 0 and child.stdout.strip() == "committed", child.stderr
        for i in range(12):  # the manager's view says keys are evictable; the store keeps them
            manager.put(filler(i), block_for(filler(i)))
        assert all(manager._entries[k.digest].stored and "disk" in manager.where(k) for k in keys)
        assert manager.store.refs(keys) == [1] * len(keys)
        assert manager.stats().tiers["disk"].blocks <= 8 and SessionStore(manager.store).verify("chat").problems["chat"] == [
            f"session 'chat': block {i // LAYERS} layer {i % LAYERS} ({bytes(k).hex()}): summary missing or corrupt"
            for i, k in enumerate(keys)
        ]


def test_a_failed_spill_to_disk_stores_nothing_of_the_batch(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with manager_for(store_path, disk_blocks=8, persist=True) as manager:
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


def test_a_known_block_being_moved_up_is_still_written_through(store_path: Path) -> None:
    """A session commits the blocks it wrote with persist=True; one the prefetcher is promoting
    at that moment must get its disk copy too, else the commit finds it missing."""
    with manager_for(store_path, disk_blocks=8) as manager:
        key = keys_for(ids_of(4), 1)[0]
        manager.put(key, block_for(key))  # known, no disk copy (no store.persist)
        manager._entries[key.digest].busy = True  # as during a host -> device move
        manager.put_many([key], block_for(key)[None], persist=True)
        manager._entries[key.digest].busy = False
        manager.flush()
        assert "disk" in manager.where(key) and SummaryRows(manager.store).present([key]) == 0 and manager.store.contains(key)
