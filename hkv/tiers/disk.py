"""The disk tier: blocks as records in an LMDB environment.

Store layout (one folder): LMDB files ``data.mdb`` / ``lock.mdb`` with named sub-databases
``blocks`` (key: the 16-byte :class:`~hkv.blocks.BlockKey`; value: a record, 64-byte header +
raw payload, see :mod:`hkv.blocks`), ``keys`` (the same keys, value: the record's length, u64
little-endian; listing or sizing them reads no record page, while listing ``blocks`` costs a
4 KiB read per block) and
``meta`` (JSON values, no pickle): ``format`` holds the format version and block layout,
``usage`` the bytes and count of stored records. All are updated in the same write
transaction, so they agree and are exact after a kill -9.

Writes go through one writer thread (:mod:`.lmdb_writer`): each submission is one unit (all of
it is stored, or none), a future that resolves once its transaction is durable (kill -9 and
power loss). The environment uses ``sync=True, metasync=False``: one fdatasync per commit, the
meta page made durable by the next commit or an explicit sync before any future resolves.
Measured here: ``metasync=True`` (two fsyncs per commit) halved the write rate, ``writemap``
was slower still.

Reads take a read transaction and copy straight from LMDB's memory map into the caller's tensor
(header and xxh3 checksum checked, see :func:`hkv.blocks.decode_into`); :mod:`.lmdb_hints` first
asks the kernel to read each record of the batch in one request, so the reads overlap.

Map size: LMDB stores a record larger than half a page in whole overflow pages (plus a 16-byte
page header), so a 48 KiB + 64 B record takes 13 pages = 52 KiB (factor 1.082), plus about
64 bytes of B-tree leaf per block. ``map_size`` is ``capacity_bytes`` scaled by that exact
factor for the layout, plus 1.5 % and room for two write batches and 16 MiB of slack (freelist,
copy-on-write pages of a transaction); ``capacity_bytes`` itself is enforced by this class on
the record bytes, and an ``lmdb.MapFullError`` is reported as TierFullError too.
"""

from __future__ import annotations

import json
import math
import mmap
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import lmdb
import torch

from ..blocks import (
    FORMAT_VERSION,
    HEADER_SIZE,
    KEY_BYTES,
    BlockKey,
    BlockLayout,
    RecordError,
    decode_into,
    encode_header,
    tensor_bytes,
)
from .base import BlockNotFoundError, Tier, TierError, TierFullError
from .lmdb_hints import ReadHints
from .lmdb_writer import BatchWriter, WriteJob

MAX_DBS = 8  # blocks, meta, and room for later sub-databases (sessions, ...)
_PAGE = mmap.PAGESIZE
_PAGE_HEADER = 16  # LMDB's page header, in bytes
_LEAF_BYTES = 64  # B-tree leaf bytes per block (node + key + overflow pgno, half-full pages)
_SLACK = 16 * 2**20  # bytes: freelist, branch pages, meta


class StoreError(TierError):
    """A folder that cannot be opened as this hkv store (not a store, newer format, other layout)."""


def map_size_for(capacity_bytes: int, layout: BlockLayout, writer_batch: int) -> int:
    """LMDB map size (bytes) that always holds ``capacity_bytes`` of records of ``layout``."""
    record = layout.record_nbytes
    pages = math.ceil((record + _PAGE_HEADER) / _PAGE) * _PAGE  # overflow pages of one record
    factor = (pages + _LEAF_BYTES) / record
    size = capacity_bytes * factor * 1.015 + 2 * writer_batch * pages + _SLACK
    return math.ceil(size / _PAGE) * _PAGE


def _layout_json(layout: BlockLayout) -> dict[str, object]:
    dtype = str(layout.dtype).removeprefix("torch.")
    return {"kv_heads": layout.kv_heads, "block_tokens": layout.block_tokens, "head_dim": layout.head_dim, "dtype": dtype}


class DiskTier(Tier):
    """Blocks of one layout in an LMDB store at ``path``; ``capacity_bytes`` bounds the record bytes.

    Thread-safe; several processes may open the same ``path`` (LMDB's lock file orders them).
    """

    name = "disk"

    def __init__(
        self, path: str | Path, layout: BlockLayout, capacity_bytes: int, *, writer_batch: int = 64, readonly: bool = False
    ) -> None:
        if capacity_bytes < layout.record_nbytes:
            raise ValueError(f"capacity_bytes = {capacity_bytes} is smaller than one record ({layout.record_nbytes} bytes)")
        if writer_batch < 1:
            raise ValueError(f"writer_batch = {writer_batch} must be at least 1")
        self.path, self.layout, self.capacity_bytes = Path(path), layout, int(capacity_bytes)
        self.writer_batch, self.readonly = writer_batch, readonly
        self._check_folder()
        try:
            self._env = lmdb.open(
                str(self.path), map_size=map_size_for(self.capacity_bytes, layout, writer_batch), max_dbs=MAX_DBS,
                subdir=True, readonly=readonly, lock=True, sync=True, metasync=False, readahead=False, create=not readonly,
                max_readers=256,
            )  # fmt: skip
        except lmdb.Error as error:
            raise StoreError(f"{self.path}: cannot open as an LMDB store: {error}") from None
        try:
            self._blocks, self._index, self._meta = self._open_dbs()
        except BaseException:
            self._env.close()
            raise
        self._hints = ReadHints(KEY_BYTES, layout.record_nbytes)
        self._closed = False
        self._close_lock = threading.Lock()
        self._writer: BatchWriter | None = None
        if not readonly:
            self._writer = BatchWriter(
                self._env, self._apply, lambda job: self._full_error(job, "the LMDB map is full"),
                max_blocks=writer_batch, name=f"hkv disk writer {self.path}", touch=self._touch,
            )  # fmt: skip

    # -- opening --------------------------------------------------------------------------------
    def _check_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a folder; the disk tier needs a folder")
        if self.path.is_dir() and not (self.path / "data.mdb").exists():
            others = sorted(p.name for p in self.path.iterdir() if p.name != "lock.mdb")
            if others:
                raise StoreError(f"{self.path} is not an hkv store: it holds {', '.join(others[:5])} but no data.mdb")
        if not self.path.exists():
            if self.readonly:
                raise StoreError(f"{self.path} does not exist (opened read-only)")
            self.path.mkdir(parents=True)

    def _open_dbs(self) -> tuple[object, object, object]:
        want = {"format_version": FORMAT_VERSION, "layout": _layout_json(self.layout)}
        with self._env.begin() as txn:
            names = {bytes(k) for k, _ in txn.cursor()}
        if names - {b"blocks", b"keys", b"meta", b"sessions"}:
            raise StoreError(f"{self.path} is an LMDB store but not an hkv store (databases {sorted(names)})")
        if not names:  # a new store
            if self.readonly:
                raise StoreError(f"{self.path} is an empty LMDB store (opened read-only)")
            blocks, index, meta = (self._env.open_db(name) for name in (b"blocks", b"keys", b"meta"))
            with self._env.begin(write=True, db=meta) as txn:
                txn.put(b"format", json.dumps(want).encode())
                txn.put(b"usage", json.dumps({"used_bytes": 0, "blocks": 0}).encode())
            return blocks, index, meta
        if not {b"blocks", b"keys", b"meta"} <= names:
            raise StoreError(f"{self.path} is not an hkv store (no blocks / keys / meta databases)")
        meta = self._env.open_db(b"meta", create=False)
        with self._env.begin(db=meta) as txn:
            raw = txn.get(b"format")
        try:
            stored = json.loads(raw)
            version, layout = int(stored["format_version"]), stored["layout"]
        except (TypeError, ValueError, KeyError):
            raise StoreError(f"{self.path}: unreadable store metadata {raw!r}") from None
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {version} is newer than this hkv ({FORMAT_VERSION}); upgrade hkv"
            )
        diffs = [f"{k} {layout.get(k)} != {v}" for k, v in want["layout"].items() if layout.get(k) != v]
        if diffs:
            raise StoreError(f"{self.path}: block layout differs from the store's (store != requested): {', '.join(diffs)}")
        return self._env.open_db(b"blocks", create=False), self._env.open_db(b"keys", create=False), meta

    # -- reading --------------------------------------------------------------------------------
    def _where(self, key: BlockKey) -> str:
        return f"disk tier {self.path}: block {key.hex()}"

    def get_into(self, key: BlockKey, out: torch.Tensor) -> None:
        """Copy the block into ``out`` (``layout.shape``, CPU). Raises BlockNotFoundError, RecordError."""
        self.get_many_into([key], out.unsqueeze(0))

    def get_many_into(self, keys: Sequence[BlockKey], out: torch.Tensor) -> None:
        """``out``: ``[n, *layout.shape]`` (CPU). One read transaction; the disk reads of the batch overlap.

        Raises BlockNotFoundError, RecordError / CorruptRecordError naming the key.
        """
        self._check_open()
        if len(keys) != len(out):
            raise ValueError(f"get_many_into: {len(keys)} keys but out holds {len(out)} blocks")
        raw = [bytes(key) for key in keys]
        with self._env.begin(db=self._blocks, buffers=True) as txn:
            predicted = self._hints.prefetch(txn.cursor(), raw)  # start every record's disk read now
            for key, raw_key, guess, block in zip(keys, raw, predicted, out):
                record = txn.get(raw_key)
                if record is None:
                    raise BlockNotFoundError(f"{self._where(key)} not found")
                self._hints.confirm(guess, record)
                decode_into(record, block, key, where=self._where(key))

    def contains(self, key: BlockKey) -> bool:
        self._check_open()
        with self._env.begin(db=self._index, buffers=True) as txn:
            return txn.get(bytes(key)) is not None

    def keys(self) -> Iterator[BlockKey]:
        """The stored keys (a snapshot taken at the call), in key order."""
        self._check_open()
        with self._env.begin(db=self._index) as txn:
            return iter([BlockKey(k) for k in txn.cursor().iternext(keys=True, values=False)])

    def __len__(self) -> int:
        return self._usage()["blocks"]

    def used_bytes(self) -> int:
        """Bytes of stored records (header + payload), as committed."""
        return self._usage()["used_bytes"]

    def _usage(self, txn: lmdb.Transaction | None = None) -> dict[str, int]:
        self._check_open()
        if txn is None:
            with self._env.begin(db=self._meta) as txn:
                return json.loads(txn.get(b"usage", db=self._meta))
        return json.loads(txn.get(b"usage", db=self._meta))

    def verify(self, keys: Sequence[BlockKey] | None = None) -> list[tuple[BlockKey, str]]:
        """Check every record (or those of ``keys``): header, key, length, checksum, key index.

        Returns ``(key, error message)`` for each bad or missing record; empty when all is well.
        """
        self._check_open()
        scratch = torch.empty(self.layout.shape, dtype=self.layout.dtype)
        problems: list[tuple[BlockKey, str]] = []
        if keys is None:
            with self._env.begin(db=self._blocks) as txn:
                stored = {BlockKey(k) for k in txn.cursor().iternext(keys=True, values=False)}
            listed = set(self.keys())
            problems += [(key, f"{self._where(key)} is stored but not in the key index") for key in sorted(stored - listed)]
            keys = sorted(stored | listed)
        for key in keys:
            try:
                self.get_into(key, scratch)
            except (RecordError, BlockNotFoundError) as error:
                problems.append((key, str(error)))
        return problems

    # -- writing --------------------------------------------------------------------------------
    def submit_put_many(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> Future[None]:
        """Queue blocks (``[n, *layout.shape]``) for the writer; the data is copied now.

        The future resolves once the transaction holding them is committed and durable, or
        raises TierFullError (nothing of this submission stored) or another TierError.
        """
        self._check_writable()
        if blocks.shape[1:] != self.layout.shape or blocks.dtype != self.layout.dtype or len(keys) != len(blocks):
            raise ValueError(
                f"submit_put_many: {len(keys)} keys and blocks {tuple(blocks.shape)} {blocks.dtype}; "
                f"expected [n, {', '.join(map(str, self.layout.shape))}] {self.layout.dtype}"
            )
        blocks = blocks.detach().cpu()
        puts: dict[bytes, bytearray] = {}  # a key given twice keeps its last block
        for key, block in zip(keys, blocks):
            payload = tensor_bytes(block)
            record = bytearray(HEADER_SIZE + len(payload))
            record[:HEADER_SIZE] = encode_header(key, block, payload)
            record[HEADER_SIZE:] = payload
            puts[bytes(key)] = record
        return self._writer.submit(WriteJob(puts=list(puts.items())))

    def put_many(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> None:
        """Store ``blocks`` (``[n, *layout.shape]``) durably. Raises TierFullError."""
        self.submit_put_many(keys, blocks).result()

    def put(self, key: BlockKey, block: torch.Tensor) -> None:
        self.put_many([key], block.unsqueeze(0))

    def delete_many(self, keys: Sequence[BlockKey]) -> int:
        """Drop blocks durably; returns how many were stored."""
        self._check_writable()
        return self._writer.submit(WriteJob(deletes=[bytes(k) for k in keys])).result()

    def delete(self, key: BlockKey) -> bool:
        return self.delete_many([key]) == 1

    def flush(self) -> None:
        """Wait until everything submitted so far is committed (or failed)."""
        if self._writer is not None and not self._closed:
            self._writer.submit(WriteJob()).result()

    def _touch(self) -> None:
        """Commit a transaction that changes nothing but the usage record (see BatchWriter)."""
        try:
            with self._env.begin(write=True, db=self._meta) as txn:
                txn.put(b"usage", txn.get(b"usage"))
        except lmdb.Error:
            pass  # the retry reports the full map

    def _apply(self, batch: list[WriteJob]) -> list[object]:
        """Do ``batch`` in one write transaction (runs in the writer thread); a result per job."""
        results: list[object] = []
        with self._env.begin(write=True, db=self._blocks) as txn:
            usage = self._usage(txn)
            for job in batch:
                sizes = [self._stored_nbytes(txn, key) for key, _ in job.puts]  # old records, if any
                delta = sum(len(record) - (old or 0) for (_, record), old in zip(job.puts, sizes))
                if usage["used_bytes"] + delta > self.capacity_bytes:
                    results.append(self._full_error(job, f"{usage['used_bytes']} bytes used"))
                    continue
                for key, record in job.puts:
                    txn.put(key, record, db=self._blocks)
                    txn.put(key, len(record).to_bytes(8, "little"), db=self._index)
                usage["used_bytes"] += delta
                usage["blocks"] += sum(old is None for old in sizes)
                deleted = 0
                for key in job.deletes:
                    old = self._stored_nbytes(txn, key)
                    if old is not None:
                        usage["used_bytes"] -= old
                        txn.delete(key, db=self._blocks)
                        txn.delete(key, db=self._index)
                        deleted += 1
                usage["blocks"] -= deleted
                results.append(deleted if job.deletes else None)
            txn.put(b"usage", json.dumps(usage).encode(), db=self._meta)
        return results

    def _stored_nbytes(self, txn: lmdb.Transaction, key: bytes) -> int | None:
        """Bytes of the record stored under ``key`` (from the key index: no record page is read)."""
        size = txn.get(key, db=self._index)
        return None if size is None else int.from_bytes(size, "little")

    def _full_error(self, job: WriteJob, why: str) -> TierFullError:
        need = sum(len(record) for _, record in job.puts)
        return TierFullError(
            f"disk tier {self.path}: cannot store {len(job.puts)} blocks ({need} bytes): {why}, "
            f"capacity {self.capacity_bytes} bytes"
        )

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TierError(f"disk tier {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise TierError(f"disk tier {self.path} is open read-only")

    def close(self) -> None:
        """Commit what was submitted, stop and join the writer, close the environment. Idempotent."""
        if getattr(self, "_closed", True):
            return
        with self._close_lock:
            if self._closed:
                return
            if self._writer is not None:
                self._writer.close()  # first: a submit from now on raises TierError instead of hanging
            self._closed = True
            self._env.close()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
