"""O_DIRECT block reads (hkv/store/direct_reads.py, ``store.direct_reads``) and the B-tree walk
that locates records for them and for the map's read hints (hkv/store/locate.py): the same bytes
as the map, damage still named, and the map taking over wherever a direct read cannot be trusted."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import xxhash

from hkv.blocks import BlockKey, BlockLayout, CorruptRecordError
from hkv.errors import BlockNotFoundError
from hkv.store.block_store import BlockStore
from hkv.store.direct_reads import DirectReader
from hkv.tiers.disk import DiskTier


SMOL = BlockLayout(kv_heads=3, block_tokens=64, head_dim=64, dtype=torch.float16)  # 48 KiB records, 13 pages


def key_of(index: int) -> BlockKey:
    return BlockKey(xxhash.xxh3_128_digest(index.to_bytes(8, "little")))


def blocks(count: int, layout: BlockLayout = SMOL, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, *layout.shape, generator=torch.Generator().manual_seed(seed)).to(layout.dtype)


def _store(path: Path, count: int, layout: BlockLayout = SMOL, encoding: str = "none") -> torch.Tensor:
    data = blocks(count, layout)
    with DiskTier(path, layout, 4 * count * layout.record_nbytes, encoding=encoding, segments=False) as tier:  # records in LMDB
        tier.put_many([key_of(i) for i in range(count)], data)
    return data


def test_direct_reads_return_the_stored_bytes_in_any_order(tmp_path: Path) -> None:
    data = _store(tmp_path / "store", 96)
    order = list(range(96))
    random.Random(1).shuffle(order)
    with DiskTier(tmp_path / "store", SMOL, 1 << 30, readonly=True, direct_reads=True) as tier:
        out = torch.empty(len(order), *SMOL.shape, dtype=SMOL.dtype)
        tier.get_many_into([key_of(i) for i in order], out)
        assert tier.direct.available, "ext4 under /tmp takes O_DIRECT"
        assert tier.direct.reads == 96 and tier.direct.fallbacks == 0
    assert torch.equal(out.view(torch.int16), data[order].view(torch.int16))


def test_a_store_of_two_encodings_is_read_directly(tmp_path: Path) -> None:
    _store(tmp_path / "store", 8)
    extra = blocks(8, seed=5)
    with DiskTier(tmp_path / "store", SMOL, 1 << 28, encoding="int8", segments=False) as tier:
        tier.put_many([key_of(100 + i) for i in range(8)], extra)
    with DiskTier(tmp_path / "store", SMOL, 1 << 28, readonly=True, direct_reads=True) as tier:
        out = torch.empty(16, *SMOL.shape, dtype=SMOL.dtype)
        tier.get_many_into([key_of(i) for i in range(8)] + [key_of(100 + i) for i in range(8)], out)
        assert tier.direct.reads == 16
    step = extra.float().abs().amax() / 127
    assert (out[8:].float() - extra.float()).abs().max() <= step  # int8: within a quantization step


def test_a_flipped_payload_byte_is_named_by_a_direct_read(tmp_path: Path) -> None:
    _store(tmp_path / "store", 4)
    env = lmdb.open(str(tmp_path / "store"), max_dbs=8, map_size=1 << 28)
    blocks_db = env.open_db(b"blocks")
    with env.begin(write=True, db=blocks_db) as txn:
        record = bytearray(txn.get(bytes(key_of(2))))
        record[-100] ^= 0x40
        txn.put(bytes(key_of(2)), bytes(record))
    env.close()
    with DiskTier(tmp_path / "store", SMOL, 1 << 28, readonly=True, direct_reads=True) as tier:
        out = torch.empty(4, *SMOL.shape, dtype=SMOL.dtype)
        with pytest.raises(CorruptRecordError, match=key_of(2).hex()):
            tier.get_many_into([key_of(i) for i in range(4)], out)
        assert tier.direct.available  # the map agreed that the record is damaged: direct reads stay on
        with pytest.raises(BlockNotFoundError):
            tier.get_many_into([key_of(99)], out[:1])


def _shift(locations: list, index: int, pages: int) -> list:
    return [(loc[0] + pages, loc[1]) if i == index and loc is not None else loc for i, loc in enumerate(locations)]


def test_a_span_that_fails_its_page_check_is_read_through_the_map(tmp_path: Path, monkeypatch) -> None:
    data = _store(tmp_path / "store", 6)
    with DiskTier(tmp_path / "store", SMOL, 1 << 28, readonly=True, direct_reads=True) as tier:
        real = tier._locator.locate
        # One location one page off: the span's header names another page, so the map reads it.
        monkeypatch.setattr(tier._locator, "locate", lambda *args: _shift(real(*args), 3, 1))
        out = torch.empty(6, *SMOL.shape, dtype=SMOL.dtype)
        tier.get_many_into([key_of(i) for i in range(6)], out)
        assert tier.direct.fallbacks == 1 and tier.direct.reads == 5
    assert torch.equal(out.view(torch.int16), data.view(torch.int16))


def test_a_record_the_direct_read_misplaces_is_read_through_the_map(tmp_path: Path, monkeypatch, caplog) -> None:
    data = _store(tmp_path / "store", 4)
    with DiskTier(tmp_path / "store", SMOL, 1 << 28, readonly=True, direct_reads=True) as tier:
        # Every location is record 0's: each span passes its page check (a real overflow record
        # is there) but holds another key, so the map decides, and wins.
        real = tier._locator.locate
        monkeypatch.setattr(tier._locator, "locate", lambda *args: [real(*args)[0]] * len(args[-1]))
        out = torch.empty(4, *SMOL.shape, dtype=SMOL.dtype)
        tier.get_many_into([key_of(i) for i in range(4)], out)
        assert tier.direct.mismatches == 3
        assert "disagreed with the map" in caplog.text
    assert torch.equal(out.view(torch.int16), data.view(torch.int16))


def test_the_locator_finds_every_record_of_a_deep_tree(tmp_path: Path) -> None:
    """2,000 records: a B-tree with branch pages; every record found where LMDB has it."""
    layout = BlockLayout(kv_heads=1, block_tokens=16, head_dim=64, dtype=torch.float16)  # 2 KiB + header: overflow
    _store(tmp_path / "store", 2000, layout)
    with BlockStore(tmp_path / "store", layout, 1 << 30, readonly=True) as store, store.reading(buffers=True) as txn:
        raw = [bytes(key_of(i)) for i in range(2000)] + [bytes(key_of(5000))]
        found = store._locator.locate(txn.txn, store._main_db, b"blocks", raw)
        assert txn.txn.stat(txn.db["blocks"])["depth"] >= 2
        for key, location in zip(raw[:-1], found):
            assert location is not None
            value = txn.get("blocks", key)  # where LMDB itself has the record: 16 bytes into its first page
            where = np.frombuffer(value, dtype=np.uint8).ctypes.data
            assert (where, len(value)) == (store._locator.map_base + location[0] * 4096 + 16, location[1])
        assert found[-1] is None
        for db in (b"blocks", b"keys"):  # the leaves a key listing walks, all asked for at once
            stat = txn.txn.stat(txn.db[db.decode()])
            assert store._locator.warm_leaves(txn.txn, store._main_db, db) == (stat["leaf_pages"] if stat["depth"] >= 2 else 0)
    with BlockStore(tmp_path / "store", layout, 1 << 30, readonly=True) as store:
        assert store.key_digests() == sorted(raw[:-1])


def test_without_o_direct_the_map_reads_everything(tmp_path: Path, monkeypatch) -> None:
    data = _store(tmp_path / "store", 5)
    monkeypatch.delattr(os, "O_DIRECT")  # a platform without it (macOS); tmpfs takes it on this kernel
    with DiskTier(tmp_path / "store", SMOL, 1 << 28, readonly=True, direct_reads=True) as tier:
        out = torch.empty(5, *SMOL.shape, dtype=SMOL.dtype)
        tier.get_many_into([key_of(i) for i in range(5)], out)
        assert not tier.direct.available and tier.direct.reads == 0
    assert torch.equal(out.view(torch.int16), data.view(torch.int16))


def test_small_records_live_on_leaf_pages_and_are_read_through_the_map(tmp_path: Path) -> None:
    tiny = BlockLayout(kv_heads=1, block_tokens=4, head_dim=8, dtype=torch.float16)  # 64 B payload
    data = _store(tmp_path / "store", 10, tiny)
    with BlockStore(tmp_path / "store", tiny, 1 << 24, readonly=True, direct_reads=True) as store:
        out = torch.empty(10, *tiny.shape, dtype=tiny.dtype)
        store.get_many_into([key_of(i) for i in range(10)], out)
        assert store.direct.reads == 0
    assert torch.equal(out.view(torch.int16), data.view(torch.int16))


def test_a_reader_of_a_missing_file_is_unavailable_and_reads_nothing(tmp_path: Path) -> None:
    reader = DirectReader(tmp_path / "missing.mdb")
    assert not reader.available
    assert reader.read([(1, 50_000), None]) == [None, None]
    reader.close()
