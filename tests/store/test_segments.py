"""Block records in segment files (store format 3, hkv.store.segments): round trips in every
encoding, packing, torn tails, damage named by key, a format-2 store opened and upgraded,
compaction, and kill -9 during writes and during compaction (20 trials each)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import hkv.store.block_store as store_module
from hkv.blocks import HEADER_SIZE, BlockKey, BlockLayout, CorruptRecordError
from hkv.encoding import decode, encode
from hkv.memory import page_aligned_empty
from hkv.errors import StoreError
from hkv.store import linux_aio
from hkv.store.batched_decode import BatchedDecode
from hkv.store.compaction import segment_use
from hkv.store.segment_reads import _page_runs
from hkv.store.segments import PAGE, Place, list_segments, segment_path
from hkv.store.staging import StagingBuffers
from hkv.tiers.disk import DiskTier

from helpers.records import raw_env

SMOL = BlockLayout(kv_heads=3, block_tokens=64, head_dim=64, dtype=torch.float16)  # 49,216-byte records
LAYOUT = BlockLayout(kv_heads=1, block_tokens=16, head_dim=64, dtype=torch.float16)
REC = LAYOUT.record_nbytes
TRIALS = 20


@pytest.fixture(params=["aio", "page-cache"])
def aio_reads(request) -> bool:
    """Both read paths of a segment batch: Linux native AIO with O_DIRECT, and the page cache."""
    if request.param == "aio" and linux_aio.probe() is None:
        pytest.skip("Linux native AIO not available here")
    return request.param == "aio"


def _read_path_used(tier: DiskTier, aio_reads: bool) -> None:
    aio = tier.segment_reader.aio
    assert (aio is not None and aio.reads > 0) if aio_reads else aio is None


def key_of(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(8, "little") * 2)


def block_of(i: int, layout: BlockLayout = LAYOUT) -> torch.Tensor:
    return torch.randn(layout.shape, generator=torch.Generator().manual_seed(i)).to(layout.dtype)


def blocks_of(indices, layout: BlockLayout = LAYOUT) -> torch.Tensor:
    return torch.stack([block_of(i, layout) for i in indices])


def _place(path: Path, key: BlockKey) -> Place | None:
    env = raw_env(path)
    with env.begin() as txn:
        entry = txn.get(bytes(key), db=env.open_db(b"keys", txn=txn))
    env.close()
    return Place.decode(entry)


@pytest.mark.parametrize("encoding", ["none", "int8", "int4"])
def test_round_trip_in_each_encoding_and_records_are_packed(tmp_path: Path, encoding: str, aio_reads: bool) -> None:
    blocks = blocks_of(range(32), SMOL)
    with DiskTier(tmp_path / "s", SMOL, 1 << 26, encoding=encoding, aio_reads=aio_reads) as tier:
        tier.put_many([key_of(i) for i in range(32)], blocks)
        record = tier.record_nbytes
        out = page_aligned_empty(tuple(blocks.shape), blocks.dtype)  # as the host pool's rows: raw payloads read straight in
        tier.get_many_into([key_of(i) for i in reversed(range(32))], out)
        _read_path_used(tier, aio_reads)
        if aio_reads:
            assert tier.segment_reader.aio.straight == (32 if encoding == "none" else 0)
            base = page_aligned_empty((32 * SMOL.nbytes + 64,), torch.uint8)
            unaligned = base[64:].view(SMOL.dtype).view(32, *SMOL.shape)  # rows off the 512-byte grid: read, then copied
            tier.get_many_into([key_of(i) for i in reversed(range(32))], unaligned)
            assert tier.segment_reader.aio.straight == (32 if encoding == "none" else 0)
            assert torch.equal(unaligned.view(torch.uint8), out.view(torch.uint8))
        assert tier.verify() == [] and tier.used_bytes() == 32 * record
    expected = blocks.flip(0) if encoding == "none" else None
    if expected is not None:
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    else:  # lossy: within the encoding's error, and decoded the same way a second time
        assert (out.float() - blocks.flip(0).float()).abs().max() < (0.05 if encoding == "int8" else 0.6)
    (file,) = list_segments(tmp_path / "s").values()
    # Lossy records packed end to end; raw ones padded so that each payload starts on 512 bytes
    # (448 bytes a record here), which O_DIRECT can then read straight into a tensor row.
    first, stride = (448, record + 448) if encoding == "none" else (0, record)
    assert os.path.getsize(file) == PAGE + -(-(first + 31 * stride + record) // PAGE) * PAGE  # one page of padding per batch at most
    places = [_place(tmp_path / "s", key_of(i)) for i in range(32)]
    assert [p.offset for p in places] == [PAGE + first + i * stride for i in range(32)] and {p.length for p in places} == {record}
    if encoding == "none":
        assert all((p.offset + HEADER_SIZE) % 512 == 0 for p in places)


def test_a_torn_tail_is_ignored_and_the_store_writes_on(store_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 64 * REC) as tier:
        tier.put_many([key_of(i) for i in range(5)], blocks_of(range(5)))
    (file,) = list_segments(store_path).values()
    with open(file, "ab") as handle:  # half a batch a kill -9 left: bytes no index entry names
        handle.write(os.urandom(3 * REC // 2))
    with DiskTier(store_path, LAYOUT, 64 * REC) as tier:
        assert tier.verify() == [] and len(tier) == 5
        tier.put_many([key_of(i) for i in range(5, 9)], blocks_of(range(5, 9)))
        out = torch.empty(9, *LAYOUT.shape, dtype=LAYOUT.dtype)
        tier.get_many_into([key_of(i) for i in range(9)], out)
    assert torch.equal(out, blocks_of(range(9)))
    assert len(list_segments(store_path)) == 2  # a writer never appends to another's segment


def test_flipped_and_truncated_segment_records_name_the_key(store_path: Path, aio_reads: bool) -> None:
    with DiskTier(store_path, LAYOUT, 64 * REC) as tier:
        tier.put_many([key_of(i) for i in range(4)], blocks_of(range(4)))
    flipped, last = _place(store_path, key_of(1)), _place(store_path, key_of(3))
    (file,) = list_segments(store_path).values()
    with open(file, "r+b") as handle:
        handle.seek(flipped.offset + 1000)
        byte = handle.read(1)
        handle.seek(flipped.offset + 1000)
        handle.write(bytes([byte[0] ^ 0x04]))
    os.truncate(file, last.offset + last.length - 100)  # the file cut inside the last record
    with DiskTier(store_path, LAYOUT, 64 * REC, aio_reads=aio_reads) as tier:
        one = torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype)
        with pytest.raises(CorruptRecordError, match=f"{key_of(1).hex()}.*checksum"):
            tier.get_into(key_of(1), one)
        with pytest.raises(CorruptRecordError, match=f"{key_of(3).hex()}.*truncated"):
            tier.get_many_into([key_of(0), key_of(3)], torch.empty(2, *LAYOUT.shape, dtype=LAYOUT.dtype))
        assert sorted(key for key, _ in tier.verify()) == sorted([key_of(1), key_of(3)])
        tier.get_into(key_of(2), one)
        assert torch.equal(one, block_of(2))
        _read_path_used(tier, aio_reads)
    os.unlink(file)
    with DiskTier(store_path, LAYOUT, 64 * REC, readonly=True, aio_reads=aio_reads) as tier:
        with pytest.raises(CorruptRecordError, match=f"{key_of(0).hex()}.*segment file .* is missing"):
            tier.get_into(key_of(0), one)


def _format(path: Path) -> int:
    env = raw_env(path)
    with env.begin() as txn:
        version = json.loads(txn.get(b"format", db=env.open_db(b"meta", txn=txn)))["format_version"]
    env.close()
    return version


def test_a_format_2_store_is_read_as_it_is_and_upgraded_on_a_writable_open(store_path: Path, monkeypatch) -> None:
    with DiskTier(store_path, LAYOUT, 64 * REC, segments=False) as tier:  # today's format: records in LMDB
        tier.put_many([key_of(i) for i in range(6)], blocks_of(range(6)))
    assert _format(store_path) == 2 and not list_segments(store_path)
    with DiskTier(store_path, LAYOUT, 64 * REC, readonly=True) as tier:
        assert tier.format_version == 2 and tier.verify() == []
    with DiskTier(store_path, LAYOUT, 64 * REC) as tier:  # writable, segments on: format 4 (segments, fp16 summaries)
        assert tier.format_version == 4 and tier.compact_summaries
        tier.put_many([key_of(i) for i in range(4, 10)], blocks_of(range(4, 10)))  # 4, 5 replace LMDB records
        tier.delete(key_of(0))
        out = torch.empty(9, *LAYOUT.shape, dtype=LAYOUT.dtype)
        tier.get_many_into([key_of(i) for i in range(1, 10)], out)  # a batch of both kinds
        assert torch.equal(out, blocks_of(range(1, 10)))
        assert tier.verify() == [] and tier.used_bytes() == 9 * REC and tier.usage_problem() is None
    assert _format(store_path) == 4
    assert _place(store_path, key_of(1)) is None and _place(store_path, key_of(5)) is not None
    env = raw_env(store_path)
    with env.begin() as txn:  # the replaced LMDB records are gone, not left behind
        assert sorted(bytes(k) for k, _ in txn.cursor(db=env.open_db(b"blocks", txn=txn))) == sorted(bytes(key_of(i)) for i in (1, 2, 3))
    env.close()
    monkeypatch.setattr(store_module, "STORE_VERSION", 2)  # an hkv from before segments
    with pytest.raises(StoreError, match="store format version 4 is newer than this hkv \\(2\\); upgrade hkv"):
        DiskTier(store_path, LAYOUT, 64 * REC, readonly=True)


def test_deletes_compact_a_mostly_dead_segment_and_punch_dead_pages(store_path: Path) -> None:
    layout = SMOL
    with DiskTier(store_path, layout, 1 << 26) as tier:
        tier.put_many([key_of(i) for i in range(20)], blocks_of(range(20), layout))
    (first,) = list_segments(store_path)
    with DiskTier(store_path, layout, 1 << 26) as tier:  # another process's segment now: compactable
        allocated = os.stat(segment_path(store_path, first)).st_blocks
        tier.delete_many([key_of(i) for i in range(8)])  # 40% dead: kept, but its dead pages go back
        assert first in list_segments(store_path)
        assert os.stat(segment_path(store_path, first)).st_blocks < allocated * 0.7
        tier.delete_many([key_of(i) for i in range(8, 14)])  # 70% dead: compacted
        assert first not in list_segments(store_path)
        (use,) = segment_use(tier)
        assert use.records == 6 and use.live_bytes == 6 * tier.record_nbytes
        out = torch.empty(6, *layout.shape, dtype=layout.dtype)
        tier.get_many_into([key_of(i) for i in range(14, 20)], out)
        assert torch.equal(out, blocks_of(range(14, 20), layout)) and tier.verify() == []


def _fork(run) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            run()
        finally:
            os._exit(0)
    return pid


def _kill_at_random(pid: int, rng: random.Random, within: float) -> None:
    time.sleep(rng.uniform(0.0, within))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _check(path: Path, must: set[int]) -> None:
    """The store opens, verifies, holds every block of ``must`` and nothing but whole blocks."""
    with DiskTier(path, LAYOUT, 1 << 28) as tier:
        assert tier.verify() == [] and tier.usage_problem() is None
        keys = list(tier.keys())
        indices = [int.from_bytes(bytes(key)[:8], "little") for key in keys]
        assert must <= set(indices), f"lost acknowledged blocks {sorted(must - set(indices))[:5]}"
        out = torch.empty(len(keys), *LAYOUT.shape, dtype=LAYOUT.dtype)
        tier.get_many_into(keys, out)
        for i, block in zip(indices, out):
            assert torch.equal(block, block_of(i)), f"block {i} reads back different bytes"


@pytest.mark.slow  # 20 forked writers: ~40 s on 2 shared cores
def test_kill_9_while_writing_segments_20_trials(tmp_path: Path) -> None:
    """Each step puts 4 blocks and deletes the 4th (dead records, punched pages); a block whose
    put returned is acknowledged and must survive every later kill."""
    rng = random.Random(15)
    path, log = tmp_path / "store", tmp_path / "acknowledged"
    acknowledged: set[int] = set()
    for trial in range(TRIALS):
        start = trial * 100_000

        def write(start: int = start) -> None:
            with DiskTier(path, LAYOUT, 1 << 28, writer_batch=8) as tier, open(log, "a") as out:
                for i in range(start, start + 50_000, 4):
                    tier.put_many([key_of(j) for j in range(i, i + 4)], blocks_of(range(i, i + 4)))
                    out.write(f"{i + 4}\n")
                    out.flush()
                    tier.delete_many([key_of(i + 3)])

        _kill_at_random(_fork(write), rng, 0.6)
        ends = [int(line) for line in log.read_text().split()] if log.exists() else []
        end = max([e for e in ends if start < e <= start + 50_000], default=start)
        acknowledged |= {i for i in range(start, end) if i % 4 != 3}
        _check(path, acknowledged)
    assert len(acknowledged) > TRIALS


@pytest.mark.slow  # 20 forked compactions, each checked twice: ~75 s on 2 shared cores
def test_kill_9_while_compacting_20_trials(tmp_path: Path) -> None:
    rng = random.Random(16)
    base = tmp_path / "base"
    with DiskTier(base, LAYOUT, 1 << 28) as tier:
        for i in range(0, 2000, 200):
            tier.put_many([key_of(j) for j in range(i, i + 200)], blocks_of(range(i, i + 200)))
    with DiskTier(base, LAYOUT, 1 << 28) as tier:
        tier.delete_many([key_of(j) for j in range(0, 2000, 3)])  # a third dead: below the automatic threshold
    keep = {j for j in range(2000) if j % 3}
    timing = tmp_path / "timing"
    shutil.copytree(base, timing)
    started = time.perf_counter()  # the child's whole run: open, compact, close
    with DiskTier(timing, LAYOUT, 1 << 28) as tier:
        assert tier.compact_segments(0.1).compacted == 1
    duration = time.perf_counter() - started
    for trial in range(TRIALS):
        path = tmp_path / f"t{trial}"
        shutil.copytree(base, path)

        def compact(path: Path = path) -> None:
            with DiskTier(path, LAYOUT, 1 << 28) as tier:
                tier.compact_segments(0.1)

        _kill_at_random(_fork(compact), rng, duration)
        _check(path, keep)
        with DiskTier(path, LAYOUT, 1 << 28) as tier:  # running it again finishes the job
            tier.compact_segments(0.1)
            assert all(use.dead_share <= 0.1 for use in segment_use(tier))
        _check(path, keep)
        shutil.rmtree(path)


def test_a_segments_link_is_refused(store_path: Path, tmp_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 64 * REC) as tier:
        tier.put(key_of(1), block_of(1))
    (store_path / "segments").rename(tmp_path / "elsewhere")
    (store_path / "segments").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="segments is not a folder"):
        DiskTier(store_path, LAYOUT, 64 * REC)


@pytest.mark.parametrize(("written", "reader"), [("none", "none"), ("int4", "int4"), ("int8", "int4")],
                         ids=["raw-straight-in", "staged-for-one-decode", "checked-whole"])  # fmt: skip
def test_a_read_that_finds_its_segment_compacted_away_looks_the_block_up_again(store_path: Path, written: str, reader: str,
                                                                               aio_reads: bool) -> None:  # fmt: skip
    with DiskTier(store_path, LAYOUT, 64 * REC, encoding=written) as tier:
        tier.put_many([key_of(i) for i in range(6)], blocks_of(range(6)))
    with DiskTier(store_path, LAYOUT, 64 * REC, encoding=reader, aio_reads=aio_reads) as tier:
        old = _place_in(tier, key_of(5))  # what a reader looked up before the compaction's commit
        tier.delete_many([key_of(i) for i in range(4)])  # 4 of 6 dead: compacted, the file deleted
        assert not segment_path(store_path, old.segment).exists() and _place_in(tier, key_of(5)) != old
        out = torch.empty(1, *LAYOUT.shape, dtype=LAYOUT.dtype)
        batch = BatchedDecode(out)
        tier._get_segments([key_of(5)], [old], [0], out, batch.read, encoding="none", batch=batch)  # the reader's read, after the deletion
        batch.finish()
        _read_path_used(tier, aio_reads)
        expected = block_of(5).unsqueeze(0)
        if written != "none":
            decode(encode(expected, written), written, expected)
        assert torch.equal(out[0], expected[0])


def _place_in(tier: DiskTier, key: BlockKey) -> Place:
    with tier.reading() as txn:
        return txn.place(bytes(key))


def test_staging_buffers_are_reused_bounded_and_padded_with_zeros() -> None:
    staging = StagingBuffers(3 * PAGE)
    first, views, give_first = staging.take([100, 200])
    views[0][:] = b"\xff" * 100
    views[1][:] = b"\xee" * 200
    assert len(first) == PAGE and bytes(first[300:]) == bytes(PAGE - 300)
    _, _, give_second = staging.take([2 * PAGE])
    waited = threading.Event()

    def third() -> None:
        staging.take([PAGE])[2]()
        waited.set()

    thread = threading.Thread(target=third)
    thread.start()
    assert not waited.wait(0.2)  # over the limit: waits for a buffer to come back
    give_second()
    assert waited.wait(5)
    thread.join()
    give_first()
    again, views, _ = staging.take([50])
    assert bytes(again[50:]) == bytes(PAGE - 50)  # a reused buffer's old bytes are zeroed past the records


def test_read_hints_merge_records_whose_pages_touch_and_nothing_else() -> None:
    places = [Place(1, 3 * PAGE, 100), Place(1, PAGE, 2 * PAGE - 10), Place(1, 3 * PAGE + 100, 50), Place(2, PAGE, 10),
              Place(1, 5 * PAGE, 10)]  # fmt: skip
    assert _page_runs(places) == [
        (1, PAGE, 3 * PAGE + 150),  # pages 1-2, then page 3: touching
        (1, 5 * PAGE, 5 * PAGE + 10),  # page 4 unread: a range of its own
        (2, PAGE, PAGE + 10),
    ]
