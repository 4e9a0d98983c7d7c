"""Session records made by hand (no model): the block layout, identity, keys, block contents,
summaries and tails of tiny sessions, and raw edits of a closed store (the session store and
the tier manager's stored-block tests)."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import torch

from hkv.blocks import BlockKey, BlockLayout, chain_hashes
from hkv.sessions.records import ModelIdentity, SessionRecord
from hkv.sessions.store import SessionStore
from hkv.store.segments import Place, segment_path
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


def raw_env(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), max_dbs=8, map_size=1 << 26)


def rewrite(path: Path, db: bytes, key: bytes, change) -> None:
    """Change one stored value by hand (the store must be closed in this process). A block
    record (``db`` ``b"blocks"``) is changed where it is: in LMDB, or in its segment file (a
    shorter value: the index entry is cut to it, as a record cut short reads)."""
    env = raw_env(path)
    handle = env.open_db(db)
    with env.begin(write=True, db=handle) as txn:
        place = Place.decode(txn.get(key, db=env.open_db(b"keys", txn=txn))) if db == b"blocks" else None
        if place is None:
            txn.put(key, bytes(change(bytearray(txn.get(key)))))
        else:
            with open(segment_path(Path(path), place.segment), "r+b") as handle_file:
                handle_file.seek(place.offset)
                changed = bytes(change(bytearray(handle_file.read(place.length))))
                handle_file.seek(place.offset)
                handle_file.write(changed[: place.length])
            if len(changed) != place.length:
                shorter = Place(place.segment, place.offset, len(changed))
                txn.put(key, shorter.encode(), db=env.open_db(b"keys", txn=txn))
    env.close()


def flip(offset: int):
    def change(value: bytearray) -> bytearray:
        value[offset] ^= 0x40
        return value

    return change
