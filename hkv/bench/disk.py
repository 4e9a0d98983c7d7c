"""Disk half of ``hkv bench tiers``: the LMDB disk tier against a raw file of the same size.

Five figures, in GB/s (10^9 bytes per second, payload bytes), each the best of ``repeats`` runs:

- ``raw_disk_write_gbps``: one file written sequentially in 4 MiB O_DIRECT writes from an
  aligned buffer, then fsync'ed (the clock stops after the fsync);
- ``raw_disk_read_gbps``: the same file read back sequentially in 4 MiB O_DIRECT reads;
- ``raw_random_read_gbps``: as many block-sized (``layout.nbytes``) O_DIRECT reads as the tier
  reads blocks, at random page-aligned offsets of that file, ``read_threads x read_batch`` in
  flight at once (the tier's parallelism: so many records are hinted or read at once), page cache
  dropped;
- ``raw_buffered_write_gbps``: a second baseline, the same file written through the page cache
  and fsync'ed. LMDB always writes through the page cache, so this is its ceiling; on a small
  cloud VM it can be several times below O_DIRECT (measured 0.17-0.24 vs 1.3-1.6 GB/s here);
- ``disk_write_gbps``: blocks put into a fresh :class:`~hkv.tiers.disk.DiskTier` (records in
  segment files, store format 3: each batch one O_DIRECT write + ``fdatasync``, then the LMDB
  index commit), ``submit_batch`` per ``submit_put_many``, which the writer groups into
  transactions of up to ``writer_batch`` blocks (the clock stops when the last transaction is
  committed and durable);
- ``disk_read_gbps``: every block read back in a random order with ``get_many_into`` batches
  of ``read_batch`` blocks into a host buffer, by ``read_threads`` threads (the prefetcher's
  defaults: 2 workers, 16-block jobs), after the page cache is dropped (``read_cache = "cold"``),
  the store opened before the clock starts (``store.aio_reads``, the default: each batch in one
  Linux AIO submission with O_DIRECT). Where dropping the cache is refused the figure is
  labelled ``"warm"``;
- ``disk_cache_read_gbps``: the same reads through the page cache (``store.aio_reads =
  false``: each batch's records hinted, then read one by one), side by side in the same run;
- ``disk_lmdb_write_gbps`` / ``disk_lmdb_read_gbps``: the same writes and reads with
  ``store.segments = false`` (records inside LMDB, format 2: the path before segment files; reads
  through the map with batch hints), side by side in the same run.

Where O_DIRECT is not supported the raw file is read and written through the page cache (write
+ fsync; read after the cache drop) and ``raw_direct`` is False.
"""

from __future__ import annotations

import math
import mmap
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import xxhash

from ..blocks import BlockKey, BlockLayout
from ..memory import page_aligned_empty
from ..store.segments import list_segments
from ..threads import serial_torch
from ..tiers.disk import DiskTier

SMOLLM2_LAYOUT = BlockLayout(kv_heads=3, block_tokens=64, head_dim=64, dtype=torch.float16)  # 48 KiB
RAW_CHUNK = 4 * 2**20  # bytes per raw read / write call


@dataclass(slots=True)
class DiskFigures:
    """Throughputs in GB/s (10^9 B/s) of payload bytes; sizes in bytes."""

    disk_read_gbps: float
    disk_cache_read_gbps: float
    disk_write_gbps: float
    disk_lmdb_write_gbps: float  # the same writes with store.segments = false (records in LMDB)
    disk_lmdb_read_gbps: float  # the same reads of that store (through LMDB's map)
    raw_disk_read_gbps: float
    raw_disk_write_gbps: float
    raw_random_read_gbps: float  # block-sized O_DIRECT reads at random offsets, read_parallelism at once
    raw_buffered_write_gbps: float  # the same file written through the page cache, then fsync'ed
    read_cache: str  # "cold" (page cache dropped before each read) or "warm"
    total_bytes: int
    block_bytes: int
    blocks: int
    writer_batch: int  # most blocks per write transaction
    submit_batch: int  # blocks per submit_put_many call
    read_batch: int  # blocks per get_many_into call
    read_threads: int
    read_parallelism: int  # records in flight: read_threads x read_batch, the raw random reads' threads
    repeats: int  # each figure is the best of this many runs
    raw_direct: bool  # the raw file used O_DIRECT

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def drop_page_cache() -> bool:
    """``sync`` then drop the page cache (needs root); False where that is refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def store_files(store: Path) -> list[Path]:
    """The files holding a disk store's data: LMDB's ``data.mdb`` and the segment files beside
    it (those that exist)."""
    files = [store / "data.mdb"] if (store / "data.mdb").exists() else []
    return files + sorted(list_segments(store).values())


def store_nbytes(store: Path) -> int | None:
    """Bytes of a store's data files (:func:`store_files`); None where there are none."""
    files = store_files(store)
    return sum(path.stat().st_size for path in files) if files else None


def drop_store_pages(store: Path, *, records_only: bool = False) -> str:
    """:func:`drop_file_pages` for every data file of the store in folder ``store`` (with
    ``records_only``, its segment files alone: the block records, not the index); "ok" or the
    first reason one could not be dropped."""
    files = sorted(list_segments(store).values()) if records_only else store_files(store)
    problems = [why for why in map(drop_file_pages, files) if why != "ok"]
    return problems[0] if problems else "ok"


def drop_file_pages(path: Path) -> str:
    """Ask the kernel to drop ``path``'s cached pages; "ok" or why not."""
    if not hasattr(os, "posix_fadvise"):
        return "posix_fadvise unavailable"
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except OSError as error:
        return f"posix_fadvise failed: {error}"
    return "ok"


def _raw_write(path: Path, total_bytes: int, *, direct: bool = True) -> tuple[float, bool]:
    """Seconds to write ``total_bytes`` sequentially and fsync; whether O_DIRECT was used."""
    buffer = mmap.mmap(-1, RAW_CHUNK)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(RAW_CHUNK))
    direct = getattr(os, "O_DIRECT", 0) if direct else 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
    except OSError:
        direct, fd = 0, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(total_bytes // RAW_CHUNK):
            os.write(fd, buffer)
        os.fsync(fd)
        return time.perf_counter() - start, bool(direct)
    finally:
        os.close(fd)
        buffer.close()


def _raw_read(path: Path, direct: bool) -> float:
    """Seconds to read the file sequentially in RAW_CHUNK reads."""
    buffer = mmap.mmap(-1, RAW_CHUNK)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        start = time.perf_counter()
        while os.readv(fd, [buffer]) > 0:
            pass
        return time.perf_counter() - start
    finally:
        os.close(fd)
        buffer.close()


def _raw_random_read(path: Path, block_bytes: int, count: int, threads: int, direct: bool) -> float:
    """Seconds to read ``count`` blocks of ``block_bytes`` at random page-aligned offsets of the
    file, ``threads`` requests in flight (one thread each; ``preadv`` releases the GIL)."""
    size = path.stat().st_size
    rng = random.Random(0)
    offsets = [rng.randrange(0, (size - block_bytes) // mmap.PAGESIZE + 1) * mmap.PAGESIZE for _ in range(count)]
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        def reader(mine: list[int]) -> None:
            buffer = mmap.mmap(-1, block_bytes)
            try:
                for offset in mine:
                    os.preadv(fd, [buffer], offset)
            finally:
                buffer.close()

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hkv bench raw reader") as pool:
            for future in [pool.submit(reader, offsets[i::threads]) for i in range(threads)]:
                future.result()
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _keys(count: int) -> list[BlockKey]:
    return [BlockKey(xxhash.xxh3_128_digest(i.to_bytes(8, "little"))) for i in range(count)]


def _tier_write(store: Path, layout: BlockLayout, keys: list[BlockKey], writer_batch: int, submit_batch: int,
                segments: bool = True) -> float:  # fmt: skip
    """Seconds to put every key (random blocks) until the last transaction is durable."""
    pool = torch.randn(submit_batch, *layout.shape).to(layout.dtype)
    capacity = len(keys) * layout.record_nbytes
    with DiskTier(store, layout, capacity, writer_batch=writer_batch, segments=segments) as tier:
        start = time.perf_counter()
        futures = [
            tier.submit_put_many(keys[i : i + submit_batch], pool[: len(keys[i : i + submit_batch])])
            for i in range(0, len(keys), submit_batch)
        ]
        for future in futures:
            future.result()
        return time.perf_counter() - start


def _tier_read(store: Path, layout: BlockLayout, keys: list[BlockKey], read_batch: int, threads: int,
               direct: bool = False, aio: bool = True) -> float:  # fmt: skip
    """Seconds to read every block once in a random order from an opened store (opening it, a
    walk of its B-tree pages, is not timed). ``threads`` readers of ``read_batch`` blocks each;
    ``direct``: records in LMDB with O_DIRECT (``store.direct_reads``) instead of through the
    map; ``aio``: segment records with Linux AIO (``store.aio_reads``), else through the page cache."""
    order = keys[:]
    random.Random(0).shuffle(order)
    batches = [order[i : i + read_batch] for i in range(0, len(order), read_batch)]
    with DiskTier(store, layout, len(keys) * layout.record_nbytes, readonly=True, direct_reads=direct, aio_reads=aio) as tier:

        def reader(mine: list[list[BlockKey]]) -> None:
            out = page_aligned_empty((read_batch, *layout.shape), layout.dtype)  # a host buffer laid out as the host pool's
            for batch in mine:
                tier.get_many_into(batch, out[: len(batch)])

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hkv bench reader", initializer=serial_torch) as pool:
            futures = [pool.submit(reader, batches[i::threads]) for i in range(threads)]
            for future in futures:
                future.result()  # a reader that failed fails the measurement (it would look faster)
        return time.perf_counter() - start


def measure_disk(
    path: Path,
    *,
    total_bytes: int = 2**30,
    layout: BlockLayout = SMOLLM2_LAYOUT,
    writer_batch: int = 1024,
    submit_batch: int = 64,
    read_batch: int = 16,
    read_threads: int = 2,
    repeats: int = 2,
) -> DiskFigures:
    """Measure the disk tier and the raw file baseline in the folder ``path`` (created; cleaned after).

    ``total_bytes`` of payload is rounded down to whole blocks and whole RAW_CHUNKs (at least
    one). Blocks are submitted ``submit_batch`` at a time; the writer groups what is waiting into
    transactions of up to ``writer_batch`` blocks. Each figure is the best of ``repeats``
    interleaved runs (the disk of a cloud machine varies by 2-4x from second to second).
    Needs about ``2 * repeats * total_bytes`` of free disk while it runs.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    count = max(1, total_bytes // layout.nbytes)
    raw_bytes = max(RAW_CHUNK, count * layout.nbytes // RAW_CHUNK * RAW_CHUNK)
    keys = _keys(count)
    best = dict.fromkeys(("raw_write", "raw_read", "raw_random_read", "buffered_write", "tier_write", "tier_read", "cache_read",
                          "lmdb_write", "lmdb_read"), math.inf)  # fmt: skip
    cold, direct, made = True, True, []
    try:
        for repeat in range(repeats):  # interleaved, so a slow spell of the disk hits both sides
            raw_file, store = path / f"hkv-bench-raw-{repeat}.bin", path / f"hkv-bench-store-{repeat}"
            buffered_file, lmdb_store = path / f"hkv-bench-buffered-{repeat}.bin", path / f"hkv-bench-lmdb-{repeat}"
            made += [raw_file, buffered_file, store, lmdb_store]
            raw_file.unlink(missing_ok=True)
            shutil.rmtree(store, ignore_errors=True)
            drop_page_cache()
            seconds, direct = _raw_write(raw_file, raw_bytes)
            best["raw_write"] = min(best["raw_write"], seconds)
            cold = drop_page_cache() and cold
            best["raw_read"] = min(best["raw_read"], _raw_read(raw_file, direct))
            cold = drop_page_cache() and cold
            seconds = _raw_random_read(raw_file, layout.nbytes, count, read_threads * read_batch, direct)
            best["raw_random_read"] = min(best["raw_random_read"], seconds)
            best["buffered_write"] = min(best["buffered_write"], _raw_write(buffered_file, raw_bytes, direct=False)[0])
            best["tier_write"] = min(best["tier_write"], _tier_write(store, layout, keys, writer_batch, submit_batch))
            cold = drop_page_cache() and cold
            best["tier_read"] = min(best["tier_read"], _tier_read(store, layout, keys, read_batch, read_threads))
            cold = drop_page_cache() and cold
            best["cache_read"] = min(best["cache_read"], _tier_read(store, layout, keys, read_batch, read_threads, aio=False))
            seconds = _tier_write(lmdb_store, layout, keys, writer_batch, submit_batch, segments=False)
            best["lmdb_write"] = min(best["lmdb_write"], seconds)
            cold = drop_page_cache() and cold
            best["lmdb_read"] = min(best["lmdb_read"], _tier_read(lmdb_store, layout, keys, read_batch, read_threads))
    finally:
        for made_path in made:  # deleted at the end: deleting (discarding) 1 GiB disturbs the next timing
            if made_path.is_dir():
                shutil.rmtree(made_path, ignore_errors=True)
            else:
                made_path.unlink(missing_ok=True)
    payload = count * layout.nbytes
    return DiskFigures(
        disk_read_gbps=payload / best["tier_read"] / 1e9,
        disk_write_gbps=payload / best["tier_write"] / 1e9,
        disk_cache_read_gbps=payload / best["cache_read"] / 1e9,
        disk_lmdb_write_gbps=payload / best["lmdb_write"] / 1e9,
        disk_lmdb_read_gbps=payload / best["lmdb_read"] / 1e9,
        raw_disk_read_gbps=raw_bytes / best["raw_read"] / 1e9,
        raw_disk_write_gbps=raw_bytes / best["raw_write"] / 1e9,
        raw_random_read_gbps=payload / best["raw_random_read"] / 1e9,
        raw_buffered_write_gbps=raw_bytes / best["buffered_write"] / 1e9,
        read_cache="cold" if cold else "warm",
        total_bytes=payload,
        block_bytes=layout.nbytes,
        blocks=count,
        writer_batch=writer_batch,
        submit_batch=submit_batch,
        read_batch=read_batch,
        read_threads=read_threads,
        read_parallelism=read_threads * read_batch,
        repeats=repeats,
        raw_direct=direct,
    )


if __name__ == "__main__":  # python -m hkv.bench.disk [FOLDER] [GiB]
    import json
    import sys

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("hkv-bench")
    gib = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    print(json.dumps(measure_disk(folder, total_bytes=int(gib * 2**30)).as_dict(), indent=2))
