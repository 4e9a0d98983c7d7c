"""The LMDB block store (hkv.store.block_store, seen through the DiskTier that the tier manager
uses): round trips, budgets, store checks, corruption, processes, kill -9, the writer thread, the
mapped pages."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lmdb
import pytest
import torch
import xxhash

import hkv.store.block_store as disk_module
from hkv.blocks import HEADER_SIZE, BlockKey, BlockLayout, CorruptRecordError
from hkv.errors import BlockNotFoundError, TierError, TierFullError
from hkv.errors import StoreError
from hkv.tiers.disk import DiskTier

from helpers.records import rewrite

# 4 KiB payload + 64 B header: each record spills into LMDB overflow pages, like real blocks.
LAYOUT = BlockLayout(kv_heads=1, block_tokens=16, head_dim=64, dtype=torch.float16)
REC = LAYOUT.record_nbytes


def key_of(index: int) -> BlockKey:
    """A key that carries its index, so a checker can recompute the block from the key alone."""
    return BlockKey(index.to_bytes(8, "little") + xxhash.xxh64_digest(index.to_bytes(8, "little")))


def block_of(index: int, layout: BlockLayout = LAYOUT) -> torch.Tensor:
    """Deterministic contents of block ``index``."""
    gen = torch.Generator().manual_seed(index)
    return torch.randn(layout.shape, generator=gen).to(layout.dtype)


def blocks_of(indices: range | list[int], layout: BlockLayout = LAYOUT) -> torch.Tensor:
    return torch.stack([block_of(i, layout) for i in indices])


@pytest.fixture
def tier(store_path: Path):
    with DiskTier(store_path, LAYOUT, 64 * REC, writer_batch=8) as opened:
        yield opened


def raw_env(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), max_dbs=8, map_size=1 << 26)


@pytest.mark.parametrize("segments", [True, False], ids=["segments", "lmdb"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_bitwise(tmp_path: Path, dtype: torch.dtype, segments: bool) -> None:
    layout = BlockLayout(2, 8, 32, dtype)
    blocks = blocks_of(range(5), layout)
    blocks[0].view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-8]).to(dtype)
    with DiskTier(tmp_path / "s", layout, 10 * layout.record_nbytes, segments=segments) as tier:
        tier.put_many([key_of(i) for i in range(5)], blocks)
        out = torch.empty_like(blocks)
        tier.get_many_into([key_of(i) for i in range(5)], out)
        one = torch.empty(layout.shape, dtype=dtype)
        tier.get_into(key_of(3), one)
        with tier.reading(buffers=True) as txn:  # the read-ahead hints find every LMDB record
            assert segments or None not in tier._locator.locate(txn.txn, tier._main_db, b"blocks", [bytes(key_of(i)) for i in range(5)])
    assert torch.equal(out.view(torch.uint8), blocks.view(torch.uint8))
    assert torch.equal(one.view(torch.uint8), blocks[3].view(torch.uint8))


def test_batched_put_get_delete_and_accounting(tier: DiskTier) -> None:
    keys = [key_of(i) for i in range(20)]
    futures = [tier.submit_put_many(keys[i : i + 5], blocks_of(range(i, i + 5))) for i in range(0, 20, 5)]
    for future in futures:
        assert future.result(timeout=10) is None
    assert len(tier) == 20 and tier.used_bytes() == 20 * REC
    assert sorted(tier.keys()) == sorted(keys)
    out = torch.empty(20, *LAYOUT.shape, dtype=LAYOUT.dtype)
    tier.get_many_into(list(reversed(keys)), out)
    assert torch.equal(out, blocks_of(range(19, -1, -1)))
    tier.put(keys[0], block_of(0))  # re-put: same bytes, no double count
    tier.put_many([key_of(50), key_of(50)], blocks_of([7, 50]))  # a key twice: the last block wins
    assert tier.used_bytes() == 21 * REC and len(tier) == 21
    tier.get_into(key_of(50), out[0])
    assert torch.equal(out[0], block_of(50)) and tier.delete(key_of(50))
    assert tier.used_bytes() == 20 * REC
    assert tier.delete(keys[0]) is True and tier.delete(keys[0]) is False
    result = tier.delete_many(keys[1:4] + [key_of(999)])
    assert result.deleted == [bytes(k) for k in keys[1:4]] and result.kept == [] and result.freed_bytes == 3 * REC
    assert not tier.contains(keys[0]) and keys[0] not in tier and keys[5] in tier
    assert len(tier) == 16 and tier.used_bytes() == 16 * REC
    with pytest.raises(BlockNotFoundError, match=keys[0].hex()):
        tier.get_into(keys[0], out[0])


def test_submit_copies_the_callers_buffer(tier: DiskTier) -> None:
    buffer = blocks_of(range(4))
    future = tier.submit_put_many([key_of(i) for i in range(4)], buffer)
    buffer.zero_()
    future.result(timeout=10)
    out = torch.empty_like(buffer)
    tier.get_many_into([key_of(i) for i in range(4)], out)
    assert torch.equal(out, blocks_of(range(4)))


def test_bad_arguments_are_rejected(tier: DiskTier, store_path: Path) -> None:
    with pytest.raises(ValueError, match="expected"):
        tier.submit_put_many([key_of(0)], torch.zeros(1, 2, 1, 16, 64, dtype=torch.float32))
    with pytest.raises(ValueError, match="smaller than one record"):
        DiskTier(store_path.parent / "other", LAYOUT, REC - 1)


def test_capacity_is_enforced_and_nothing_is_damaged(tmp_path: Path) -> None:
    with DiskTier(tmp_path / "s", LAYOUT, 3 * REC) as tier:
        tier.put_many([key_of(i) for i in range(2)], blocks_of(range(2)))
        with pytest.raises(TierFullError, match=f"capacity {3 * REC} bytes"):
            tier.put_many([key_of(i) for i in range(2, 4)], blocks_of(range(2, 4)))  # all or nothing
        assert len(tier) == 2 and not tier.contains(key_of(2))
        tier.put(key_of(2), block_of(2))
        with pytest.raises(TierFullError, match=f"{3 * REC} bytes used"):
            tier.put(key_of(3), block_of(3))
        assert tier.verify() == [] and tier.used_bytes() == 3 * REC
        tier.delete(key_of(0))
        tier.put(key_of(3), block_of(3))  # the writer survived
        out = torch.empty(3, *LAYOUT.shape, dtype=LAYOUT.dtype)
        tier.get_many_into([key_of(i) for i in (1, 2, 3)], out)
        assert torch.equal(out, blocks_of([1, 2, 3]))


def test_full_lmdb_map_becomes_tier_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_module, "map_size_for", lambda *args: 64 * 4096)  # 256 KiB map
    with DiskTier(tmp_path / "s", LAYOUT, 1000 * REC, writer_batch=4, segments=False) as tier:  # records fill the map
        stored = 0
        with pytest.raises(TierFullError, match="map is full"):
            for i in range(100):
                tier.put(key_of(i), block_of(i))
                stored += 1
        assert stored > 10 and len(tier) == stored and tier.verify() == []
        tier.delete_many([key_of(i) for i in range(5)])
        tier.put(key_of(500), block_of(500))  # the writer survived
        assert tier.contains(key_of(500)) and tier.used_bytes() == (stored - 4) * REC


def test_reopen_preserves_everything(store_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 64 * REC) as tier:
        tier.put_many([key_of(i) for i in range(10)], blocks_of(range(10)))
        tier.delete(key_of(4))
    tier.close()  # idempotent
    with pytest.raises(TierError, match="closed"):
        tier.contains(key_of(0))
    with DiskTier(store_path, LAYOUT, 64 * REC) as again:
        assert len(again) == 9 and again.used_bytes() == 9 * REC
        out = torch.empty(9, *LAYOUT.shape, dtype=LAYOUT.dtype)
        indices = [i for i in range(10) if i != 4]
        again.get_many_into([key_of(i) for i in indices], out)
        assert torch.equal(out, blocks_of(indices)) and again.verify() == []
    with DiskTier(store_path, LAYOUT, 64 * REC, readonly=True) as readonly:
        assert len(readonly) == 9
        with pytest.raises(TierError, match="read-only"):
            readonly.put(key_of(20), block_of(20))


def test_layout_mismatch_is_refused(store_path: Path) -> None:
    DiskTier(store_path, BlockLayout(2, 64, 32), 8 * 2**20).close()
    with pytest.raises(StoreError, match="block_tokens 64 != 32"):
        DiskTier(store_path, BlockLayout(2, 32, 32), 8 * 2**20)
    with pytest.raises(StoreError, match="dtype float16 != bfloat16"):
        DiskTier(store_path, BlockLayout(2, 64, 32, torch.bfloat16), 8 * 2**20)


def test_newer_format_version_is_refused(store_path: Path) -> None:
    DiskTier(store_path, LAYOUT, 8 * REC).close()
    env = raw_env(store_path)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        stored = json.loads(txn.get(b"format"))
        txn.put(b"format", json.dumps({**stored, "format_version": 99}).encode())
    env.close()
    with pytest.raises(StoreError, match="format version 99 is newer"):
        DiskTier(store_path, LAYOUT, 8 * REC)


def test_paths_that_are_not_stores_are_refused(tmp_path: Path) -> None:
    file_path = tmp_path / "file"
    file_path.write_text("hello")
    with pytest.raises(StoreError, match="not a folder"):
        DiskTier(file_path, LAYOUT, 8 * REC)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreError, match="not an hkv store.*cat.jpg"):
        DiskTier(folder, LAYOUT, 8 * REC)
    other = tmp_path / "other-lmdb"
    env = lmdb.open(str(other), map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"user-key", b"value")
    env.close()
    with pytest.raises(StoreError, match="not an hkv store"):
        DiskTier(other, LAYOUT, 8 * REC)
    with pytest.raises(StoreError, match="does not exist"):
        DiskTier(tmp_path / "missing", LAYOUT, 8 * REC, readonly=True)


def _rewrite_record(path: Path, key: BlockKey, change) -> None:
    rewrite(path, b"blocks", bytes(key), change)  # where the record is: its segment file, or LMDB


def test_flipped_byte_is_detected_with_the_key(store_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 16 * REC) as tier:
        tier.put_many([key_of(i) for i in range(3)], blocks_of(range(3)))

    def flip(record: bytearray) -> bytearray:
        record[HEADER_SIZE + 100] ^= 0x10
        return record

    _rewrite_record(store_path, key_of(1), flip)
    with DiskTier(store_path, LAYOUT, 16 * REC) as tier:
        with pytest.raises(CorruptRecordError, match=f"{key_of(1).hex()}.*checksum"):
            tier.get_into(key_of(1), torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype))
        problems = tier.verify()
        assert [key for key, _ in problems] == [key_of(1)] and "checksum" in problems[0][1]
        out = torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype)
        tier.get_into(key_of(2), out)  # the others still read
        assert torch.equal(out, block_of(2))


def test_truncated_record_is_detected(store_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 16 * REC) as tier:
        tier.put_many([key_of(i) for i in range(2)], blocks_of(range(2)))
    _rewrite_record(store_path, key_of(0), lambda record: record[: REC - 1000])
    with DiskTier(store_path, LAYOUT, 16 * REC) as tier:
        with pytest.raises(CorruptRecordError, match=f"{key_of(0).hex()}.*truncated"):
            tier.get_into(key_of(0), torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype))
        assert [key for key, _ in tier.verify([key_of(0), key_of(1), key_of(7)])] == [key_of(0), key_of(7)]


def test_concurrent_reads_from_threads(tier: DiskTier) -> None:
    tier.put_many([key_of(i) for i in range(32)], blocks_of(range(32)))
    expected = blocks_of(range(32))
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        out = torch.empty(4, *LAYOUT.shape, dtype=LAYOUT.dtype)
        try:
            for _ in range(50):
                picks = rng.sample(range(32), 4)
                tier.get_many_into([key_of(i) for i in picks], out)
                if not torch.equal(out, expected[picks]):
                    failures.append(f"thread {seed} read wrong data for {picks}")
        except BaseException as error:  # a reader that raises is a failure, not a silent early exit
            failures.append(f"thread {seed} raised {error!r}")

    def write() -> None:
        try:
            tier.put_many([key_of(i) for i in range(100, 130)], blocks_of(range(100, 130)))
        except BaseException as error:
            failures.append(f"writer raised {error!r}")

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    writer = threading.Thread(target=write)
    for thread in [*threads, writer]:
        thread.start()
    for thread in [*threads, writer]:
        thread.join()
    assert failures == [] and len(tier) == 62


_CHILD_PRELUDE = f"""
import sys, torch, xxhash
from pathlib import Path
from hkv.blocks import BlockKey, BlockLayout
from hkv.tiers.disk import DiskTier
LAYOUT = BlockLayout({LAYOUT.kv_heads}, {LAYOUT.block_tokens}, {LAYOUT.head_dim}, torch.float16)
{textwrap.dedent(__import__("inspect").getsource(key_of))}
{textwrap.dedent(__import__("inspect").getsource(block_of))}
"""

_READER = _CHILD_PRELUDE + """
with DiskTier(Path(sys.argv[1]), LAYOUT, int(sys.argv[2]), readonly=True) as tier:
    out = torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype)
    for round in range(2):
        for i in range(int(sys.argv[3])):
            tier.get_into(key_of(i), out)
            if not torch.equal(out, block_of(i)):
                sys.exit(f"block {i} differs")
    print("ok", len(tier))
"""


def test_two_processes_read_at_once(tier: DiskTier, store_path: Path) -> None:
    tier.put_many([key_of(i) for i in range(40)], blocks_of(range(40)))
    child = subprocess.Popen(
        [sys.executable, "-c", _READER, str(store_path), str(tier.capacity_bytes), "40"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out = torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype)
    expected = blocks_of(range(40))
    while child.poll() is None:  # read here while the child reads there
        for i in range(40):
            tier.get_into(key_of(i), out)
            assert torch.equal(out, expected[i])
    stdout, stderr = child.communicate(timeout=30)
    assert child.returncode == 0, stderr
    assert stdout.split() == ["ok", "40"]


_WRITER = _CHILD_PRELUDE + """
start, capacity = int(sys.argv[2]), int(sys.argv[3])
tier = DiskTier(Path(sys.argv[1]), LAYOUT, capacity, writer_batch=8)
print("ready", flush=True)
pending = []
for i in range(start, start + 100_000, 4):
    pending.append((i + 4, tier.submit_put_many([key_of(j) for j in range(i, i + 4)],
                                                torch.stack([block_of(j) for j in range(i, i + 4)]))))
    if len(pending) > 3:  # keep a few submissions in flight; report what is committed
        end, future = pending.pop(0)
        future.result()
        print(end, flush=True)
"""


@pytest.mark.slow  # four writer processes, each importing torch: 12-18 s on 2 cores
def test_kill_9_while_writing_leaves_a_sound_store(store_path: Path) -> None:
    capacity = 200_000 * REC
    rng = random.Random(1234)
    acknowledged: list[tuple[int, int]] = []  # (start, end) of blocks each writer reported committed
    for trial in range(4):
        start = trial * 1_000_000
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(store_path), str(start), str(capacity)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        lines = child.stdout.read().split()
        acknowledged.append((start, int(lines[-1]) if lines else start))

        with DiskTier(store_path, LAYOUT, capacity) as tier:
            assert tier.verify() == []
            keys = list(tier.keys())
            assert tier.used_bytes() == len(keys) * REC and len(tier) == len(keys)
            indices = [int.from_bytes(bytes(key)[:8], "little") for key in keys]
            assert all(key_of(i) == key for i, key in zip(indices, keys)), "a key the writer never made"
            stored = set(indices)
            for first, end in acknowledged:  # everything reported committed survived
                assert stored.issuperset(range(first, end)), f"lost acknowledged blocks in [{first}, {end})"
            out = torch.empty(len(keys), *LAYOUT.shape, dtype=LAYOUT.dtype)
            tier.get_many_into(keys, out)
            for i, block in zip(indices, out):
                assert torch.equal(block, block_of(i)), f"block {i} reads back different bytes"
    assert sum(end - first for first, end in acknowledged) > 0


def test_verify_reports_a_record_missing_from_the_key_index(store_path: Path) -> None:
    with DiskTier(store_path, LAYOUT, 16 * REC, segments=False) as tier:  # an LMDB record outlives its entry
        tier.put_many([key_of(i) for i in range(3)], blocks_of(range(3)))
    env = raw_env(store_path)
    index = env.open_db(b"keys")
    with env.begin(write=True, db=index) as txn:
        txn.delete(bytes(key_of(2)))
    env.close()
    with DiskTier(store_path, LAYOUT, 16 * REC) as tier:
        problems = tier.verify()
        assert [key for key, _ in problems] == [key_of(2)] and "not in the key index" in problems[0][1]


def _in_thread(call, timeout: float = 10.0):
    """Run ``call`` in a thread; its result or exception (the test fails if it hangs)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as error:
            outcome.append(("error", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the call hung"
    return outcome[0]


def test_a_submission_once_the_writer_is_closing_raises_instead_of_hanging(tier: DiskTier) -> None:
    tier.put_many([key_of(0)], blocks_of([0]))
    tier._writer.close()  # as DiskTier.close does first; a racing put/flush/delete must not hang
    for call in (
        lambda: tier.put_many([key_of(1)], blocks_of([1])),
        tier.flush,
        lambda: tier.delete_many([key_of(0)]),
    ):
        status, error = _in_thread(call)
        assert status == "error" and isinstance(error, TierError) and "writer is closed" in str(error)


class _WriterCrash(BaseException):
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_jobs_fail_when_the_writer_thread_dies(tier: DiskTier, monkeypatch) -> None:
    def crash(batch):
        raise _WriterCrash("boom")

    monkeypatch.setattr(tier._writer, "_apply", crash)
    status, error = _in_thread(lambda: tier.put_many([key_of(1)], blocks_of([1])))
    assert status == "error" and isinstance(error, TierError) and "writer stopped" in str(error)
    tier._writer._thread.join(5)
    status, error = _in_thread(lambda: tier.put_many([key_of(2)], blocks_of([2])))
    assert status == "error" and isinstance(error, TierError) and "writer is closed" in str(error)
    tier.close()  # still closes cleanly


def _mapped_kib(data_file: Path) -> int:
    """Resident KiB of this process's mappings of ``data_file`` (/proc/self/smaps)."""
    total, inside, name = 0, False, str(data_file.resolve())
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                inside = line.rstrip().endswith(name)
            elif inside and line.startswith("Rss:"):
                total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("release", [True, False], ids=["released", "kept"])
def test_mapped_store_pages_do_not_pile_up_in_rss(tmp_path: Path, release: bool) -> None:
    """Reading every block maps the whole store into the process unless the tier releases the
    pages; released, the data read is unchanged and the resident mapping stays near the threshold."""
    layout = BlockLayout(kv_heads=2, block_tokens=16, head_dim=64)  # 8 KiB records
    tier = DiskTier(tmp_path / "store", layout, 64 << 20, segments=False)  # records in LMDB's map
    tier.direct.disable()  # the map path (O_DIRECT reads map nothing: tests/store/test_direct_reads.py)
    tier._mapped.every_bytes = (1 << 20) if release else (1 << 40)
    g = torch.Generator().manual_seed(0)
    keys = [BlockKey(os.urandom(16)) for _ in range(1024)]  # 8 MiB of records
    blocks = torch.randn(len(keys), *layout.shape, generator=g).to(layout.dtype)
    for i in range(0, len(keys), 128):
        tier.put_many(keys[i : i + 128], blocks[i : i + 128])
    out = torch.empty(64, *layout.shape, dtype=layout.dtype)
    for i in range(0, len(keys), 64):
        tier.get_many_into(keys[i : i + 64], out)
        assert torch.equal(out, blocks[i : i + 64])
    mapped = _mapped_kib(tier.path / "data.mdb")
    tier.close()
    if release:
        assert tier._mapped.releases >= 8
        assert mapped < 3 * 1024, f"{mapped} KiB of the store still mapped"
    else:
        assert mapped > 6 * 1024, "the store's pages stay mapped when never released (the test would prove nothing)"


def test_small_record_lookups_count_towards_releasing_the_mapped_pages(tmp_path: Path) -> None:
    """Looking up many small records (summaries, index entries: a resumed 1M-token session reads
    468,750 summaries) maps a page each, plus the kernel's fault-around: a read transaction's
    lookups are counted, so such a sweep releases the mapping too (before, a 1M-token resume
    peaked with 4.4 GiB of the store mapped)."""
    layout = BlockLayout(kv_heads=2, block_tokens=16, head_dim=64)
    tier = DiskTier(tmp_path / "store", layout, 64 << 20)
    tier._mapped.every_bytes = 1 << 20
    keys = [BlockKey(os.urandom(16)) for _ in range(256)]
    tier.put_many(keys, torch.zeros(len(keys), *layout.shape, dtype=layout.dtype))
    before = tier._mapped.releases
    with tier.reading() as store:
        sizes = [store.record_nbytes(bytes(key)) for key in keys]  # the keys index: no block page read
    assert all(size == layout.record_nbytes for size in sizes)
    assert tier._mapped.releases == before + 1  # one release at the end of the transaction
    with tier.reading() as store:
        assert store.get("keys", b"absent") is None
    assert tier._mapped.releases == before + 1  # one lookup: 16 KiB counted, far below the threshold
    tier.close()
