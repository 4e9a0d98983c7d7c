"""The block store: blocks as records in an LMDB environment (the disk tier's storage).

Store layout (one folder, format version :data:`STORE_VERSION`, docs/store.md): LMDB files
``data.mdb`` / ``lock.mdb`` with named sub-databases ``blocks`` (key: the 16-byte
:class:`~hkv.blocks.BlockKey`; value: a record, 64-byte header + raw payload, see
:mod:`hkv.blocks`), ``keys`` (the same keys, value: the record's length, u64 little-endian;
listing or sizing them reads no record page, while listing ``blocks`` costs a 4 KiB read per
block), ``meta`` (JSON values, no pickle): ``format`` holds the format version and block layout,
``usage`` the bytes and count of stored records; and, for persistent sessions
(:mod:`hkv.sessions.store`), ``refs`` (block key -> u32 LE: how many committed sessions reference
the block), ``summaries`` (block key -> checksummed fp32 key summaries) and ``sessions``
(session records and tails). All are updated in the same write transaction, so they agree and
are exact after a kill -9. A block whose ``refs`` count is > 0 is never deleted by
:meth:`BlockStore.delete_many` (checked inside the deleting transaction, so a process with a stale
view cannot delete it either).

Writes go through one writer thread (:mod:`.writer`): each submission is one unit (all of
it is stored, or none), a future that resolves once its transaction is durable (kill -9 and
power loss). Besides puts and deletes, a submission may be any function of the write
transaction (:meth:`BlockStore.submit_apply`, used by the summary rows and the session store); it runs in a nested
transaction, so one that raises changes nothing and does not disturb the others of its batch. The environment uses ``sync=True, metasync=False``: one fdatasync per commit, the
meta page made durable by the next commit or an explicit sync before any future resolves.
Measured here: ``metasync=True`` (two fsyncs per commit) halved the write rate, ``writemap``
was slower still.

Reads take a read transaction and copy straight from LMDB's memory map into the caller's tensor
(header and xxh3 checksum checked, see :func:`hkv.blocks.decode_into`); first every record of the
batch is located (:mod:`.locate`, the B-tree only) and :mod:`.read_hints` asks the kernel to read
each in one request, so the reads overlap; with ``direct_reads`` the records are read with
O_DIRECT instead (:mod:`.direct_reads`). :mod:`.read_hints` also
unmaps the pages read (and those writes walked) from the process every 64 MiB of traffic, so
that a store of any size does not pile up in the process's resident set (``MappedPages``); a
lookup of a small record (summary, index entry) counts as ``READ_MAP_BYTES`` of traffic.

Map size: LMDB stores a record larger than half a page in whole overflow pages (plus a 16-byte
page header), so a 48 KiB + 64 B record takes 13 pages = 52 KiB (factor 1.082), plus about
64 bytes of B-tree leaf per block. ``map_size`` is ``capacity_bytes`` scaled by that exact
factor for the layout, plus 1.5 % and room for two write batches and 16 MiB of slack (freelist,
copy-on-write pages of a transaction); ``capacity_bytes`` itself is enforced by this class on
the record bytes, and an ``lmdb.MapFullError`` is reported as TierFullError too.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np
import torch

from ..blocks import (
    DTYPE_NAMES,
    CorruptRecordError,
    HEADER_SIZE,
    KEY_BYTES,
    BlockKey,
    BlockLayout,
    RecordError,
    encode_header,
    payload_into,
    record_matches,
)
from ..encoding import CODES, ENCODINGS, encode
from ..errors import BlockNotFoundError, StoreDamagedError, StoreError, TierError, TierFullError
from .batched_decode import BatchedDecode, RowTargets
from .encoder import OrderedEncoder
from .files import LOCK_FILES, check_store_files, creating, hold_store
from .compaction import AUTO_DEAD_SHARE, CompactionReport, compact, punch_dead
from .pages import check_pages
from .segment_rows import ROW as SEGMENTS_ROW
from .segment_rows import SegmentStats, read_stats
from .segment_reads import SegmentReader
from .segments import Place, SegmentWriter, StagedRecords, entry_length, record_starts, segment_path
from .staging import StagingBuffers
from .direct_reads import PAGE, PAGE_HEADER, DirectReader
from .locate import Locator
from .read_hints import MappedPages, will_need
from .space import SpaceReserve, out_of_space, reserve_bytes, write_error
from .txn import DeleteResult, StoreTxn
from .writer import BatchWriter, WriteJob

T = TypeVar("T")
log = logging.getLogger(__name__)

STORE_VERSION = 4  # of the store's layout (meta ``format``); block records have their own (hkv.blocks)
SEGMENTS_VERSION = 3  # the first format whose index may name records in segment files (hkv.store.segments)
COMPACT_SUMMARIES_VERSION = 4  # the first format whose summary rows and runs may be fp16 (hkv.store.summary_rows)
LMDB_RECORDS_VERSION = 2  # the newest format with every record in the ``blocks`` database
MAX_DBS = 8  # the six below, and room for two more
DB_NAMES = ("blocks", "keys", "meta", "refs", "summaries", "sessions")
_V1_DBS = {b"blocks", b"keys", b"meta"}  # format 1 had these (and maybe an empty ``sessions``)
_PAGE = mmap.PAGESIZE
_PAGE_HEADER = 16  # LMDB's page header, in bytes
READ_MAP_BYTES = 16 << 10  # map growth counted per small-record lookup (a 4 KiB page; fault-around maps up to 64 KiB)
_LEAF_BYTES = 64  # B-tree leaf bytes per block (node + key + overflow pgno, half-full pages)
_SLACK = 16 * 2**20  # bytes: freelist, branch pages, meta
STAGING_BYTES = 64 << 20  # records of queued writes held at once, at least (StagingBuffers)


# LMDB's errors that mean its pages are not what it wrote (a bad page, a wrong page type, a
# value of impossible size): they become a StoreError naming the store and the database.
DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.PanicError, lmdb.BadValsizeError)


def damage_error(path: Path, what: str, error: Exception) -> StoreDamagedError:
    return StoreDamagedError(
        f"{path}: the store is damaged: reading {what} failed ({type(error).__name__}: {error}); "
        f"`hkv sessions verify --store {path}` lists what is affected"
    )


@contextmanager
def damage_named(path: Path, what: str) -> Iterator[None]:
    """Turn LMDB's damage errors raised inside into a StoreDamagedError naming ``what`` was read."""
    try:
        yield
    except DAMAGE_ERRORS as error:
        raise damage_error(path, what, error) from None


def map_size_for(capacity_bytes: int, layout: BlockLayout, writer_batch: int, record_nbytes: int | None = None) -> int:
    """LMDB map size (bytes) that always holds ``capacity_bytes`` of records of ``layout``
    (``record_nbytes``: their size, if encoded; the raw size otherwise)."""
    record = record_nbytes or layout.record_nbytes
    pages = math.ceil((record + _PAGE_HEADER) / _PAGE) * _PAGE  # overflow pages of one record
    factor = (pages + _LEAF_BYTES) / record
    size = capacity_bytes * factor * 1.015 + 2 * writer_batch * pages + _SLACK
    return math.ceil(size / _PAGE) * _PAGE


def _layout_json(layout: BlockLayout) -> dict[str, object]:
    dtype = str(layout.dtype).removeprefix("torch.")
    return {"kv_heads": layout.kv_heads, "block_tokens": layout.block_tokens, "head_dim": layout.head_dim, "dtype": dtype}


def _open_env(path: Path, map_size: int, readonly: bool) -> lmdb.Environment:
    try:
        return lmdb.open(
            str(path), map_size=map_size, max_dbs=MAX_DBS, subdir=True, readonly=readonly, lock=True, sync=True,
            metasync=False, readahead=False, create=not readonly, max_readers=256,
        )  # fmt: skip
    except lmdb.Error as error:
        raise StoreError(f"{path}: cannot open as an LMDB store: {error}") from None


def _db_names(env: lmdb.Environment) -> set[bytes]:
    with env.begin() as txn:
        return {bytes(k) for k, _ in txn.cursor()}


def _read_format(env: lmdb.Environment, path: Path) -> dict[str, object]:
    """The store's ``format`` record; StoreError if unreadable or newer than this hkv."""
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn, create=False)
        raw = txn.get(b"format", db=meta)
    try:
        stored = json.loads(raw)
        version, layout = int(stored["format_version"]), stored["layout"]
        if not isinstance(layout, dict):
            raise TypeError(layout)
    except (TypeError, ValueError, KeyError):
        raise StoreError(f"{path}: unreadable store metadata {raw!r}") from None
    if version > STORE_VERSION:
        raise StoreError(f"{path}: store format version {version} is newer than this hkv ({STORE_VERSION}); upgrade hkv")
    return stored


def _read_layout(env: lmdb.Environment, path: Path) -> tuple[BlockLayout, int]:
    """The block layout an existing store records, and its used record bytes."""
    if not _V1_DBS <= _db_names(env):
        raise StoreError(f"{path} is not an hkv store (no blocks / keys / meta databases)")
    layout = _read_format(env, path)["layout"]
    try:
        parsed = BlockLayout(int(layout["kv_heads"]), int(layout["block_tokens"]), int(layout["head_dim"]), DTYPE_NAMES[layout["dtype"]])
    except (KeyError, TypeError, ValueError):
        raise StoreError(f"{path}: unreadable block layout {layout!r}") from None
    with env.begin() as txn:
        usage = read_usage(txn, env.open_db(b"meta", txn=txn, create=False), env.open_db(b"keys", txn=txn, create=False))
    return parsed, usage["used_bytes"]


def parse_usage(raw: bytes | memoryview | None) -> dict[str, int] | None:
    """The ``meta/usage`` row (``{"used_bytes", "blocks"}``, non-negative integers), None if it is
    missing or not that."""
    try:
        usage = json.loads(bytes(raw)) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(usage, dict) or set(usage) != {"used_bytes", "blocks"}:
        return None
    if not all(type(v) is int and v >= 0 for v in usage.values()):
        return None
    return usage


def usage_from_index(txn: lmdb.Transaction, index: object) -> dict[str, int]:
    """Record bytes and count summed over the ``keys`` index (what the usage row must say)."""
    used = blocks = 0
    for _, size in txn.cursor(db=index):
        used += entry_length(size)
        blocks += 1
    return {"used_bytes": used, "blocks": blocks}


def read_usage(txn: lmdb.Transaction, meta: object, index: object) -> dict[str, int]:
    """The usage row; a missing or garbled one is recomputed from the ``keys`` index (the next
    write transaction stores it again), so a damaged row costs a scan, never the store."""
    usage = parse_usage(txn.get(b"usage", db=meta))
    return usage if usage is not None else usage_from_index(txn, index)


class BlockStore:
    """Blocks of one layout in an LMDB store at ``path``; ``capacity_bytes`` bounds the record bytes.

    Also the store's transactions for the rows beside the blocks (refs, summaries, sessions:
    :meth:`reading`, :meth:`submit_apply`). Thread-safe; several processes may open the same
    ``path`` (LMDB's lock file orders them). The disk tier (:class:`hkv.tiers.disk.DiskTier`) is
    this class seen as a tier. ``encoding``: how new block records are written (``"none"``, or
    lossy ``"int8"`` / ``"int4"``, :mod:`hkv.encoding`); a record of any encoding is read, as its
    header says, so one store may hold several. ``record_nbytes``: one new record's size.
    """

    def __init__(
        self, path: str | Path, layout: BlockLayout, capacity_bytes: int, *, writer_batch: int = 64, readonly: bool = False,
        exclusive: bool = False, encoding: str = "none", direct_reads: bool = False, segments: bool = True,
        aio_reads: bool = True, _env: lmdb.Environment | None = None,
    ) -> None:  # fmt: skip
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding = {encoding!r}: one of {', '.join(ENCODINGS)}")
        self.encoding, self.record_nbytes = encoding, layout.encoded_record_nbytes(encoding)
        if capacity_bytes < self.record_nbytes:
            raise ValueError(f"capacity_bytes = {capacity_bytes} is smaller than one record ({self.record_nbytes} bytes)")
        if writer_batch < 1:
            raise ValueError(f"writer_batch = {writer_batch} must be at least 1")
        self.path, self.layout, self.capacity_bytes = Path(path), layout, int(capacity_bytes)
        self.writer_batch, self.readonly, self.exclusive = writer_batch, readonly, exclusive
        self.segments = segments  # new records go to segment files (store format 3), else into LMDB
        if exclusive and readonly:
            raise ValueError("exclusive: only a writable store is held alone")
        if _env is None:
            self._check_folder()
        # Writers share the users lock; gc / repair hold it alone (a fd, closed with the store).
        try:
            self._users = None if readonly else hold_store(self.path, exclusive=exclusive)
        except BaseException:
            if _env is not None:
                _env.close()
            raise
        try:
            self._open(_env)
        except BaseException:
            if self._users is not None:
                os.close(self._users)
            raise
        self._blocks, self._index, self._meta = self._dbs["blocks"], self._dbs["keys"], self._dbs["meta"]
        self._mapped = MappedPages(self.path / "data.mdb")
        self.direct = DirectReader(self.path / "data.mdb")
        self.direct_reads = direct_reads  # block records with O_DIRECT (summary runs always, where it works)
        self._locator = Locator(self.path / "data.mdb")
        self._main_db = self._env.open_db(None)
        self.segment_reader = SegmentReader(self.path, aio=aio_reads)
        self.segment_writer = None if readonly or not self.segments else SegmentWriter(self.path, self._next_segment)
        self._reserve = SpaceReserve(self.path, reserve_bytes(self.capacity_bytes))
        self._encoder = OrderedEncoder(f"hkv encoder {self.path.name}")  # submit_put_later's thread
        # Queued writes hold at most this many bytes of records (submit waits beyond it).
        self._staging = StagingBuffers(max(STAGING_BYTES, 2 * writer_batch * self.record_nbytes))
        self._closed = False
        self._close_lock = threading.Lock()
        self._writer: BatchWriter | None = None
        if not readonly:
            self._reserve.ensure()  # False on a full disk: made again after the next delete
            self._writer = BatchWriter(
                self._env, self._apply, self._write_failed, max_blocks=writer_batch, name=f"hkv disk writer {self.path}",
                touch=self._touch, make_room=self._make_room, on_durable=self._punch_freed,
                prepare=self._write_segments if self.segment_writer is not None else None,
            )  # fmt: skip

    def _open(self, _env: lmdb.Environment | None) -> None:
        """Open (or take) the environment and its databases; closes the environment on failure."""
        if _env is None:
            with creating(self.path):  # a store created by two processes at once is initialised once
                check_store_files(self.path)
                map_size = map_size_for(self.capacity_bytes, self.layout, self.writer_batch, self.record_nbytes)
                _env = _open_env(self.path, map_size, self.readonly)
                self._env = _env
                try:
                    with damage_named(self.path, "the database catalogue"):
                        self._dbs, self.format_version = self._open_dbs()
                except BaseException:
                    self._env.close()
                    raise
        else:
            self._env = _env
            try:
                self._dbs, self.format_version = self._open_dbs()
            except BaseException:
                self._env.close()
                raise

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open_existing(
        cls, path: str | Path, *, readonly: bool = True, capacity_bytes: int | None = None, writer_batch: int = 64,
        exclusive: bool = False, segments: bool | None = None,
    ) -> BlockStore:
        """Open the store at ``path`` with the block layout it records (for tools such as
        ``hkv sessions``, which do not know the model). ``capacity_bytes`` defaults to the larger
        of the record bytes stored and the size of ``data.mdb`` (enough to delete, not to grow
        much). ``exclusive``: writable, and no other process may have it open for writing
        (:meth:`hkv.store.files.hold_store`; for ``hkv sessions gc`` / ``repair``). ``segments``:
        where new records go (None: segment files if the store is format 3 or later already). StoreError
        if ``path`` is not an hkv store or its format is newer than this hkv."""
        path = Path(path)
        if exclusive and readonly:
            raise ValueError("exclusive: only a writable store is held alone")
        data = path / "data.mdb"
        if not path.is_dir() or not check_store_files(path):
            raise StoreError(f"{path} is not an hkv store (no data.mdb)")
        file_bytes = data.stat().st_size
        env = _open_env(path, 0, readonly)  # LMDB maps at least the file; resized below
        try:
            with damage_named(path, "the database catalogue"):
                layout, used = _read_layout(env, path)
                version = int(_read_format(env, path)["format_version"])
            capacity = int(capacity_bytes) if capacity_bytes is not None else max(used, file_bytes, layout.record_nbytes)
            room = 2 * file_bytes + 2**30 if readonly else file_bytes + _SLACK  # readers: room for the store to grow
            env.set_mapsize(math.ceil(max(map_size_for(capacity, layout, writer_batch), room) / _PAGE) * _PAGE)
        except BaseException:
            env.close()
            raise
        if segments is None:
            segments = version >= SEGMENTS_VERSION
        return cls(path, layout, capacity, writer_batch=writer_batch, readonly=readonly, exclusive=exclusive, segments=segments, _env=env)

    def _check_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a folder; the disk tier needs a folder")
        if self.path.is_dir() and not (self.path / "data.mdb").exists():
            others = sorted(p.name for p in self.path.iterdir() if p.name not in LOCK_FILES)
            if others and "data.mdb" not in others:  # data.mdb listed now: another process just created the store
                raise StoreError(f"{self.path} is not an hkv store: it holds {', '.join(others[:5])} but no data.mdb")
        if not self.path.exists():
            if self.readonly:
                raise StoreError(f"{self.path} does not exist (opened read-only)")
            try:
                self.path.mkdir(parents=True, exist_ok=True)  # another process may create it at the same time
            except OSError as error:
                raise StoreError(f"cannot create the store folder {self.path}: {error.strerror} (set tiers.path or --store)") from None

    def _open_dbs(self) -> tuple[dict[str, object], int]:
        """The databases (name -> handle; None for one a read-only format-1 store lacks) and the
        store's format version. Creates a new store (format 4 with ``segments``, else 2),
        upgrades a format-1 store opened writable (the new databases and format_version 2 in one
        transaction) and a format-2 or 3 store opened writable with ``segments`` (format_version
        4: a format-2 store's records stay in LMDB and are read there, new ones go to segments;
        its fp32 summaries stay, new ones are fp16 where exact), refuses anything else. Opened
        read-only, a store is read as it is."""
        target = STORE_VERSION if self.segments else LMDB_RECORDS_VERSION
        want = {"format_version": target, "layout": _layout_json(self.layout)}
        names = _db_names(self._env)
        if names - {name.encode() for name in DB_NAMES}:
            raise StoreError(f"{self.path} is an LMDB store but not an hkv store (databases {sorted(names)})")
        if not names:  # a new store
            if self.readonly:
                raise StoreError(f"{self.path} is an empty LMDB store (opened read-only)")
            with self._env.begin(write=True) as txn:
                dbs = {name: self._env.open_db(name.encode(), txn=txn) for name in DB_NAMES}
                txn.put(b"format", json.dumps(want).encode(), db=dbs["meta"])
                txn.put(b"usage", json.dumps({"used_bytes": 0, "blocks": 0}).encode(), db=dbs["meta"])
                if target >= SEGMENTS_VERSION:
                    txn.put(SEGMENTS_ROW, SegmentStats().to_bytes(), db=dbs["meta"])
            return dbs, target
        if not _V1_DBS <= names:
            raise StoreError(f"{self.path} is not an hkv store (no blocks / keys / meta databases)")
        stored = _read_format(self._env, self.path)
        layout = stored["layout"]
        diffs = [f"{k} {layout.get(k)} != {v}" for k, v in want["layout"].items() if layout.get(k) != v]
        if diffs:
            raise StoreError(f"{self.path}: block layout differs from the store's (store != requested): {', '.join(diffs)}")
        version = int(stored["format_version"])
        if self.readonly:
            dbs = {name: self._env.open_db(name.encode(), create=False) if name.encode() in names else None for name in DB_NAMES}
            return dbs, version
        target = max(version, target)
        with self._env.begin(write=True) as txn:  # creates the databases a format-1 store lacks
            dbs = {name: self._env.open_db(name.encode(), txn=txn) for name in DB_NAMES}
            if version < target:
                txn.put(b"format", json.dumps({**stored, "format_version": target}).encode(), db=dbs["meta"])
        return dbs, target

    @property
    def compact_summaries(self) -> bool:
        """Whether summaries are written in fp16 where exact (format 4; an older hkv cannot read them)."""
        return self.format_version >= COMPACT_SUMMARIES_VERSION

    @property
    def has_sessions(self) -> bool:
        """Whether the session databases exist (False only for a format-1 store opened read-only)."""
        return self._dbs["sessions"] is not None

    # -- reading --------------------------------------------------------------------------------
    def _where(self, key: BlockKey) -> str:
        return f"disk tier {self.path}: block {key.hex()}"

    def get_into(self, key: BlockKey, out: torch.Tensor) -> None:
        """Copy the block into ``out`` (``layout.shape``, CPU). Raises BlockNotFoundError, RecordError."""
        self.get_many_into([key], out.unsqueeze(0))

    def get_many_into(self, keys: Sequence[BlockKey], out: torch.Tensor, *, rows: Sequence[int] | None = None,
                      encoding: str = "none", records: Mapping[bytes, bytes] | None = None) -> None:  # fmt: skip
        """``out``: ``[n, *layout.shape]`` (CPU). One read transaction; the disk reads of the batch overlap.
        ``rows``: the row of ``out`` each key's block goes to (distinct; default ``0 .. n - 1``,
        and then ``out`` holds exactly ``n``), e.g. the host pool's slots themselves.
        With a lossy ``encoding``, ``out`` is ``[n, payload bytes]`` uint8 and receives the blocks
        in that encoding (records already in it are copied as they are: :func:`hkv.blocks.payload_into`).
        ``records``: block key -> record bytes already in hand (a lazy pull's, fetched from the
        remote tier and still being written here): decoded from those, not read.

        Raises BlockNotFoundError, RecordError / CorruptRecordError naming the key.
        """
        self._check_open()
        if rows is None:
            if len(keys) != len(out):
                raise ValueError(f"get_many_into: {len(keys)} keys but out holds {len(out)} blocks")
            rows = range(len(keys))
        elif len(rows) != len(keys) or (rows and not 0 <= min(rows) <= max(rows) < len(out)):
            raise ValueError(f"get_many_into: {len(rows)} rows for {len(keys)} keys, out holds {len(out)} blocks")
        batch = BatchedDecode(out, len(keys)) if encoding == "none" else None  # lossy records decoded together at the end
        read_record: Callable[..., None]
        if batch is not None:
            read_record = batch.read
        else:
            layout = self.layout

            def read_record(record: memoryview, row: int, key: BlockKey, *, where: str) -> None:
                payload_into(record, out[row], layout, encoding, key, where=where)
        raw = [bytes(key) for key in keys]
        in_hand = {i for i, key in enumerate(raw) if key in records} if records else set()
        for i in in_hand:
            read_record(memoryview(records[raw[i]]), rows[i], keys[i], where=f"block {raw[i].hex()} fetched from the remote tier")
        with damage_named(self.path, "block records"), self._env.begin(db=self._blocks, buffers=True) as txn:
            entries = [None if i in in_hand else txn.get(key, db=self._index) for i, key in enumerate(raw)]
            places = [self._place_of(key, entry) for key, entry in zip(keys, entries)]
            in_lmdb = [i for i, place in enumerate(places) if place is None and i not in in_hand]
            if in_lmdb:
                self._get_lmdb(txn, [keys[i] for i in in_lmdb], [raw[i] for i in in_lmdb], [rows[i] for i in in_lmdb],
                               read_record)  # fmt: skip
        segment = [i for i, place in enumerate(places) if place is not None]
        if segment:
            self._get_segments([keys[i] for i in segment], [places[i] for i in segment], [rows[i] for i in segment], out,
                               read_record, encoding=encoding, batch=batch)  # fmt: skip
        if batch is not None:
            batch.finish()

    def _place_of(self, key: BlockKey, entry: bytes | memoryview | None) -> Place | None:
        """The segment place an index entry names (None: in LMDB, or not stored)."""
        if entry is None or len(entry) == 8:
            return None
        try:
            return Place.decode(entry)
        except ValueError as error:
            raise CorruptRecordError(f"{self._where(key)}: {error}") from None

    def _get_segments(self, keys: list[BlockKey], places: list[Place], rows: list[int], out: torch.Tensor,
                      read_record: Callable[..., None], *, encoding: str, batch: BatchedDecode | None,
                      retry: bool = True) -> None:  # fmt: skip
        """Read and check segment records into rows ``rows`` of ``out`` (:class:`~.segments.SegmentReader`:
        the batch's disk reads all in flight). A record stored as ``out`` holds blocks (raw for
        ``encoding == "none"``, else in that lossy encoding) is read straight into its row; with
        ``batch`` (raw rows), one in this store's lossy encoding straight into the batch's staging
        row, decoded with the others at the end; any other (or one that fails these fast checks)
        is read whole and checked through ``read_record(record, row, key, where=)``, which names
        the problem. A segment file gone (compaction moved its records, then deleted it) is
        looked up again once."""
        reader = self.segment_reader
        targets = RowTargets.for_read(out, self.layout, encoding, self.encoding, batch)
        moved: list[int] = []

        # A raw row's payload goes straight from the disk into the row where alignment allows.
        into = [targets.straight_into(place.length, row) for place, row in zip(places, rows)] if reader.aio is not None else None

        def land(i: int, view: memoryview | None) -> None:
            """Record ``i`` read (None: its segment file is gone)."""
            if view is None:
                moved.append(i)
                return
            key, place, row = keys[i], places[i], rows[i]
            if len(view) == HEADER_SIZE and into is not None and into[i] is not None and place.length > HEADER_SIZE:  # the payload is in its row
                if record_matches(view, into[i], targets.prefix, bytes(key)):
                    return
                view = memoryview(bytes(view) + bytes(into[i]))  # checked whole below, which names the problem
            target = targets.target(place.length, row) if len(view) == place.length else None
            if target is not None:
                dest, prefix = target
                dest[:] = view[HEADER_SIZE:]
                if record_matches(view[:HEADER_SIZE], dest, prefix, bytes(key)):
                    targets.landed(place.length, row)
                    return
            with torch.inference_mode(out.is_inference()):
                read_record(view, row, key, where=self._where(key))

        if not reader.read_each(places, land, into):  # no batch reads here: hinted, then each read on its own
            reader.hint(places)
            head = memoryview(bytearray(HEADER_SIZE))
            for i, (key, place, row) in enumerate(zip(keys, places, rows)):
                try:
                    target = targets.target(place.length, row)
                    if target is not None:
                        dest, prefix = target
                        got = reader.read_split(place, head, dest)
                        if got == place.length and record_matches(head, dest, prefix, bytes(key)):
                            targets.landed(place.length, row)
                            continue
                    with torch.inference_mode(out.is_inference()):
                        reader.read(place, lambda view, row=row, key=key: read_record(view, row, key, where=self._where(key)))
                except FileNotFoundError:
                    moved.append(i)
        if not moved:
            return
        with self._env.begin(buffers=True) as txn:
            now = [self._place_of(keys[i], txn.get(bytes(keys[i]), db=self._index)) for i in moved]
        for i, place in zip(moved, now):
            if place is None:
                raise BlockNotFoundError(f"{self._where(keys[i])} not found")
            if place == places[i] or not retry:
                raise CorruptRecordError(f"{self._where(keys[i])}: its segment file {segment_path(self.path, place.segment)} is missing")
        self._get_segments([keys[i] for i in moved], now, [rows[i] for i in moved], out, read_record,  # type: ignore[misc]
                           encoding=encoding, batch=batch, retry=False)  # fmt: skip

    def _read_place(self, key: bytes, place: Place) -> bytes:
        """One segment record's bytes, unchecked (StoreTxn.record); CorruptRecordError naming the
        key when its file is gone."""
        try:
            return self.segment_reader.read(place, bytes)  # type: ignore[return-value]
        except FileNotFoundError:
            raise CorruptRecordError(
                f"{self._where(BlockKey(key))}: its segment file {segment_path(self.path, place.segment)} is missing"
            ) from None

    def _get_lmdb(self, txn: lmdb.Transaction, keys: list[BlockKey], raw: list[bytes], rows: list[int],
                  read_record: Callable[..., None]) -> None:  # fmt: skip
        """Read records kept in LMDB's ``blocks`` database (formats 1-2, ``store.segments = false``)
        into rows ``rows`` of the read (``read_record(record, row, key, where=)``)."""
        locations = self._locator.locate(txn, self._main_db, b"blocks", raw)  # the transaction keeps them in place
        if self.direct_reads and self.direct.available:
            views = self.direct.read(locations)
            for key, raw_key, view, row in zip(keys, raw, views, rows):
                self._read_one(txn, key, raw_key, view, row, read_record)
            return
        for location in locations:  # every record's disk read starts now, before the first get waits on one
            if location is not None:
                will_need(self._locator.map_base + location[0] * PAGE + PAGE_HEADER, location[1])
        for key, raw_key, row in zip(keys, raw, rows):
            record = txn.get(raw_key)
            if record is None:
                raise BlockNotFoundError(f"{self._where(key)} not found")
            read_record(record, row, key, where=self._where(key))
        self._mapped.note(len(keys) * self.record_nbytes)

    def read_large_values(self, db: str, keys: Sequence[bytes], txn: StoreTxn, *,
                          owned: bool = False) -> list[memoryview | bytearray | None]:  # fmt: skip
        """The values of ``keys`` in database ``db`` under ``txn`` (a :meth:`reading` snapshot
        with ``buffers``): those in overflow pages read with O_DIRECT, all in flight together;
        the others through the map. None for a missing key. Views are valid until this thread's
        next direct read or the end of the transaction; with ``owned`` every value outlives
        both (the direct reads land in memory of this call's own, the map's are copied). The
        caller checks what it reads."""
        handle = txn.db[db]
        views = self.direct.read(self._locator.locate(txn.txn, self._main_db, db.encode(), keys), owned=owned)
        values: list[memoryview | bytearray | None] = []
        for key, view in zip(keys, views):
            if view is None:
                view = txn.txn.get(key, db=handle)
                if owned and view is not None:
                    view = bytearray(view)  # writable, as the direct reads' memory is
            values.append(view)
        return values

    def _read_one(self, txn: lmdb.Transaction, key: BlockKey, raw_key: bytes, view: memoryview | None, row: int,
                  read_record: Callable[..., None]) -> None:  # fmt: skip
        """Decode a record read with O_DIRECT (``view``), or read through the map where ``view``
        is None, into row ``row`` of the read (``read_record(record, row, key, where=)``). A direct read that fails the record's own checks is read again through the map,
        which decides, so a wrong location costs time, never a false error (logged once)."""
        if view is not None:
            try:
                read_record(view, row, key, where=self._where(key))
                return
            except RecordError:
                pass
        record = txn.get(raw_key)
        if record is None:
            raise BlockNotFoundError(f"{self._where(key)} not found")
        read_record(record, row, key, where=self._where(key))
        self._mapped.note(len(record))
        if view is not None:
            self.direct.mismatches += 1
            if self.direct.mismatches == 1:
                log.warning("disk tier %s: a direct read of block %s disagreed with the map (read through the map)", self.path, key.hex())

    def contains(self, key: BlockKey) -> bool:
        self._check_open()
        with damage_named(self.path, "the key index"), self._env.begin(db=self._index, buffers=True) as txn:
            return txn.get(bytes(key)) is not None

    def keys(self) -> Iterator[BlockKey]:
        """The stored keys (a snapshot taken at the call), in key order."""
        return iter([BlockKey(k) for k in self.key_digests()])

    def key_digests(self) -> list[bytes]:
        """The stored keys' 16 bytes (a snapshot taken at the call), in key order; the index's
        leaf pages are all asked of the disk first (:meth:`~.locate.Locator.warm_leaves`)."""
        self._check_open()
        with damage_named(self.path, "the key index"), self._env.begin(db=self._index, buffers=True) as txn:
            self._locator.warm_leaves(txn, self._main_db, b"keys")
            raw = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
        bad = next((k for k in raw if len(k) != KEY_BYTES), None)
        if bad is not None:  # a damaged node the page check did not see (a large tree at open)
            raise damage_error(self.path, "the key index", ValueError(f"a key of {len(bad)} bytes"))
        return raw

    def __len__(self) -> int:
        return self._usage()["blocks"]

    def used_bytes(self) -> int:
        """Bytes of stored records (header + payload), as committed."""
        return self._usage()["used_bytes"]

    @contextmanager
    def reading(self, *, buffers: bool = False) -> Iterator[StoreTxn]:
        """A read transaction over every database (a consistent snapshot); with ``buffers``,
        values are memoryviews into the map, valid only inside the block."""
        self._check_open()
        with self._env.begin(buffers=buffers) as raw:
            txn = StoreTxn(raw, self._dbs, None, read_place=self._read_place)
            try:
                yield txn
            except DAMAGE_ERRORS as error:
                raise damage_error(self.path, f"the {txn.last_db or 'store'} database", error) from None
        # Small records (summaries, index entries) cost the map far more than their bytes: each
        # lookup maps its page, and the kernel's fault-around maps cached neighbours with it.
        self._mapped.note(txn.reads * READ_MAP_BYTES)

    def refs(self, keys: Sequence[BlockKey]) -> list[int]:
        """How many committed sessions reference each of ``keys`` (the ``refs`` rows)."""
        with self.reading() as txn:
            return [txn.refs(bytes(key)) for key in keys]

    def referenced_keys(self) -> list[bytes]:
        """Every key with refs > 0 (the tier manager loads this when it opens the store; a count
        of 0 is never stored, so no value is read)."""
        with self.reading() as txn:
            return txn.keys("refs")

    def _usage(self, txn: lmdb.Transaction | None = None) -> dict[str, int]:
        self._check_open()
        if txn is None:
            with self._env.begin() as txn:
                return read_usage(txn, self._meta, self._index)
        return read_usage(txn, self._meta, self._index)

    def check_pages(self) -> None:
        """Check every B-tree page of the store (:mod:`.pages`; at open, trees larger than
        :data:`~hkv.store.pages.BUDGET_PAGES` have only their branch pages checked).
        StoreDamagedError naming the page and database."""
        self._check_open()
        check_pages(self.path / "data.mdb", budget_pages=None)

    def usage_problem(self) -> str | None:
        """What is wrong with the ``meta/usage`` row (missing, garbled, or not what the ``keys``
        index sums to), None if nothing. A writable store repairs it at its next write."""
        self._check_open()
        with self._env.begin() as txn:
            stored = parse_usage(txn.get(b"usage", db=self._meta))
            actual = usage_from_index(txn, self._index)
        if stored is None:
            return f"{self.path}: the meta/usage row is missing or garbled (the key index says {actual})"
        if stored != actual:
            return f"{self.path}: the meta/usage row says {stored}, the key index {actual}"
        return None

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
        self._check_blocks("submit_put_many", keys, blocks)
        blocks = blocks.detach()
        self._encoder.drain()  # after the puts submitted to be encoded later
        if self.encoding != "none":
            return self._submit_records(keys, encode(blocks, self.encoding).cpu().reshape(len(blocks), -1))  # batched, on blocks' device
        return self._submit_records(keys, blocks.cpu().contiguous().view(len(blocks), -1).view(torch.uint8))

    def submit_put_later(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> Future[None]:
        """:meth:`submit_put_many` for a caller that must not spend the encode's time (a tier
        manager holding its lock): a lossy store's blocks are encoded by a background thread
        (:mod:`.encoder`) and reach the writer in submission order (every other write of this
        store waits for them first). ``blocks`` must not change until the future resolves (pass a
        copy). A raw store queues them at once, as :meth:`submit_put_many` does."""
        if self.encoding == "none":
            return self.submit_put_many(keys, blocks)
        self._check_writable()
        self._check_blocks("submit_put_later", keys, blocks)
        keys, blocks = list(keys), blocks.detach()
        return self._encoder.submit(lambda: self._submit_records(keys, encode(blocks, self.encoding).cpu().reshape(len(blocks), -1)))

    def _check_blocks(self, what: str, keys: Sequence[BlockKey], blocks: torch.Tensor) -> None:
        """ValueError unless ``blocks`` is ``[len(keys), *layout.shape]`` of the layout's dtype."""
        if blocks.shape[1:] != self.layout.shape or blocks.dtype != self.layout.dtype or len(keys) != len(blocks):
            raise ValueError(
                f"{what}: {len(keys)} keys and blocks {tuple(blocks.shape)} {blocks.dtype}; "
                f"expected [n, {', '.join(map(str, self.layout.shape))}] {self.layout.dtype}"
            )

    def submit_put_encoded(self, keys: Sequence[BlockKey], payloads: torch.Tensor) -> Future[None]:
        """:meth:`submit_put_many` for blocks already encoded in this store's (lossy) encoding:
        ``payloads`` ``[n, payload bytes]`` uint8 (:func:`hkv.encoding.encode`'s rows, e.g. an
        encoded host tier's slots), written as they are, without a decode and re-encode."""
        self._check_writable()
        expected = self.record_nbytes - HEADER_SIZE
        if self.encoding == "none" or payloads.dtype != torch.uint8 or tuple(payloads.shape) != (len(keys), expected):
            raise ValueError(
                f"submit_put_encoded: {len(keys)} keys and payloads {tuple(payloads.shape)} {payloads.dtype}; expected "
                f"[n, {expected}] uint8 of a lossy encoding (this store writes {self.encoding})"
            )
        self._encoder.drain()
        return self._submit_records(keys, payloads.detach().cpu())

    def _submit_records(self, keys: Sequence[BlockKey], source: torch.Tensor) -> Future[None]:
        """Queue one record per key for the writer: ``source`` ``[n, payload bytes]`` uint8 (CPU),
        the payloads in this store's encoding."""
        shape_of = torch.empty(self.layout.shape, dtype=self.layout.dtype, device="meta")  # the header's dtype and shape
        code = CODES[self.encoding]
        last = {bytes(key): i for i, key in enumerate(keys)}  # a key given twice keeps its last block
        rows = list(last.values())
        payload_nbytes = source.shape[1]
        # Records are built in place in one page-aligned buffer (the segment writer writes it as it
        # is): the payloads in one tensor copy, then each header with its payload's checksum.
        buffer, views, give_back = self._staging.take([HEADER_SIZE + payload_nbytes] * len(rows))
        # Records of one size lie at a fixed stride (record_shift pads each the same way after the first).
        record_nbytes = HEADER_SIZE + payload_nbytes
        (first, second), _ = record_starts([record_nbytes] * 2)
        stride = second - first
        packed = torch.frombuffer(buffer, dtype=torch.uint8, count=first + (len(rows) - 1) * stride + record_nbytes)
        payloads = packed.as_strided((len(rows), payload_nbytes), (stride, 1), first + HEADER_SIZE)
        # numpy's copy, not torch's: one thread. torch splits a copy this size over its OpenMP
        # team, whose second thread then waits for a core the writer's threads hold (on 2 cores
        # that doubled the CPU time of a durable write and slowed it).
        np.copyto(payloads.numpy(), (source[rows] if len(rows) < len(source) else source).numpy())
        for i, record in zip(rows, views):
            record[:HEADER_SIZE] = encode_header(keys[i], shape_of, record[HEADER_SIZE:], code)
        job = WriteJob(puts=list(zip(last, views)))
        job.staged, job.release_staged = buffer, _once(give_back)
        job.future.add_done_callback(lambda _: job.release_staged())
        try:
            return self._writer.submit(job)
        except BaseException:
            job.release_staged()
            raise

    def put_many(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> None:
        """Store ``blocks`` (``[n, *layout.shape]``) durably. Raises TierFullError."""
        self.submit_put_many(keys, blocks).result()

    def put(self, key: BlockKey, block: torch.Tensor) -> None:
        self.put_many([key], block.unsqueeze(0))

    def delete_many(self, keys: Sequence[BlockKey]) -> DeleteResult:
        """Drop blocks durably, except those a committed session references (refs > 0, read in
        the deleting transaction): they are reported as ``kept``."""
        self._check_writable()
        self._encoder.drain()  # a put submitted earlier lands first
        result = self._writer.submit(WriteJob(deletes=[bytes(k) for k in keys], frees=True)).result()
        if result.deleted:
            self._compact_after_free()
        return result

    def delete(self, key: BlockKey) -> bool:
        """Drop one block; whether it was deleted (False: not stored, or referenced)."""
        return bool(self.delete_many([key]).deleted)

    def submit_apply(self, apply: Callable[[StoreTxn], T], *, frees: bool = False) -> Future[T]:
        """Run ``apply(store_txn)`` in the writer thread, inside a nested write transaction of the
        writer's next batch. The future resolves with its result once that transaction is
        durable, or raises what it raised (nothing it did is kept; other jobs are unaffected).
        ``apply`` must only read and write through the transaction (it may run twice, after a
        full map) and must never wait for anything that waits for the writer. ``frees``: the job
        deletes more than it writes (a session delete, gc): on a full disk it may use the space
        of the store's reserve file (:mod:`.space`)."""
        self._check_writable()
        self._encoder.drain()  # e.g. a session commit naming blocks whose puts are being encoded
        return self._writer.submit(WriteJob(apply=apply, frees=frees))

    def apply(self, apply: Callable[[StoreTxn], T], *, frees: bool = False) -> T:
        """:meth:`submit_apply` and wait: the change is durable on return."""
        result = self.submit_apply(apply, frees=frees).result()
        if frees:
            self._compact_after_free()
        return result

    def compact_segments(self, threshold: float, *, current_too: bool = False) -> CompactionReport:
        """Compact the segment files more than ``threshold`` dead and delete those no index
        entry names (:mod:`.compaction`); ``current_too``: this process's own segments too (the
        ones it filled stay locked, so out of other compactions, until then or until it closes)."""
        self._check_writable()
        if current_too:
            self.flush()  # this process's segments are let go: everything written there is committed first
        return compact(self, threshold, current_too=current_too)

    def _compact_after_free(self) -> None:
        """After a delete: compact the segments it left more than AUTO_DEAD_SHARE dead (not in a
        store held alone: gc and repair compact once, at their end)."""
        if self.exclusive or self.segment_writer is None:
            return
        try:
            compact(self, AUTO_DEAD_SHARE)
        except OSError as error:  # a full disk: the space comes back at a later delete or gc
            log.warning("%s: compacting segment files failed: %s", self.path, error)

    def flush(self) -> None:
        """Wait until everything submitted so far is committed (or failed)."""
        if self._writer is not None and not self._closed:
            self._encoder.drain()
            self._writer.submit(WriteJob()).result()

    def _touch(self) -> None:
        """Commit a transaction that changes nothing but the usage record (see BatchWriter)."""
        try:
            with self._env.begin(write=True) as txn:
                txn.put(b"usage", json.dumps(read_usage(txn, self._meta, self._index)).encode(), db=self._meta)
        except lmdb.Error:
            pass  # the retry reports the full map

    def _apply(self, batch: list[WriteJob]) -> list[object]:
        """Do ``batch`` in one write transaction (runs in the writer thread); a result per job.
        Raises lmdb.MapFullError (nothing committed; the writer retries each job alone)."""
        results: list[object] = []
        self._write_segments(batch)
        with self._env.begin(write=True, db=self._blocks) as raw:
            stats = read_stats(raw, self._meta, self._index) if self.format_version >= SEGMENTS_VERSION else None
            txn = StoreTxn(raw, self._dbs, self._usage(raw), stats, self._read_place)
            for job in batch:
                before = len(txn.freed)
                results.append(self._apply_job(txn, job) if job.apply is not None else self._put_delete(txn, job))
                job.freed = txn.freed[before:]
            raw.put(b"usage", json.dumps(txn.usage).encode(), db=self._meta)
            if txn.segments is not None:
                if self.segment_writer is not None and self.segment_writer.segment is not None:
                    txn.segments.next = max(txn.segments.next, self.segment_writer.segment + 1)
                raw.put(SEGMENTS_ROW, txn.segments.to_bytes(), db=self._meta)
        self._mapped.note(txn.written)  # block puts and apply jobs (summaries, session commits) alike
        if any(job.frees for job in batch) and not self._reserve.present():
            # Pages freed by transaction N are reused from N + 2 on: one more (tiny) commit now,
            # while the released reserve's room lasts, so the next put can use them.
            self._touch()
            self._reserve.ensure()
        return results

    def _write_segments(self, batch: list[WriteJob]) -> None:
        """Write the records of ``batch``'s put jobs to this process's segment, durably, before the
        transaction that indexes them (a job retried alone keeps its places: written once). The
        writer's prepare thread calls it while the batch before commits; ``_apply`` again for
        what that left undone."""
        if self.segment_writer is None or self.format_version < SEGMENTS_VERSION:
            return
        jobs = [job for job in batch if job.puts and job.places is None]
        if jobs:
            placed = self.segment_writer.append_jobs([StagedRecords([record for _, record in job.puts], job.staged) for job in jobs])
            for job, places in zip(jobs, placed):
                job.places = places
                if job.release_staged is not None:  # durable in the segment: the next submission may build there
                    job.release_staged()

    def _punch_freed(self, jobs: list[WriteJob]) -> None:
        """The whole pages of segment records durable transactions stopped naming go back to the
        disk now (:func:`~.segments.punch_dead`); compaction reclaims the rest."""
        places = [place for job in jobs for place in job.freed]
        if places:
            punch_dead(self.path, places)

    def _next_segment(self) -> int:
        """The lowest segment id the store has not used (its ``meta/segments`` row)."""
        with self._env.begin() as txn:
            return read_stats(txn, self._meta, self._index).next

    def _make_room(self, error: BaseException) -> bool:
        """A freeing job failed with ``error``: if the disk is full, delete the reserve file so
        that the job can run again; whether that gave back any room."""
        from_reserve = self._reserve.release() if out_of_space(self.path, error) else 0
        if from_reserve:
            log.warning("%s: the disk is full; the store's reserve (%d bytes) was released to free space", self.path, from_reserve)
        return from_reserve > 0

    def _write_failed(self, job: WriteJob | None, error: BaseException) -> TierError:
        """What a job whose transaction failed with ``error`` raises (None: a sync failed)."""
        if isinstance(error, lmdb.MapFullError) and job is not None:
            return self._full_error(job, "the LMDB map is full")
        if job is None:
            what = "the store's last commit (sync)"
        elif job.apply is not None:
            what = "a session or store update"
        else:
            what = f"{len(job.puts)} blocks ({sum(len(r) for _, r in job.puts)} bytes)" if job.puts else f"a delete of {len(job.deletes)} blocks"
        return write_error(self.path, error, what)

    def _put_delete(self, txn: StoreTxn, job: WriteJob) -> object:
        """A puts / deletes job: checked against the budget before anything is written."""
        sizes = [txn.record_nbytes(key) for key, _ in job.puts]  # old records, if any
        delta = sum(len(record) - (old or 0) for (_, record), old in zip(job.puts, sizes))
        if txn.usage["used_bytes"] + delta > self.capacity_bytes:
            return self._full_error(job, f"{txn.usage['used_bytes']} bytes used")
        if job.places is not None:
            for (key, _), place in zip(job.puts, job.places):
                txn.put_place(key, place)
            return txn.delete_unreferenced(job.deletes) if job.deletes else None
        for key, record in job.puts:
            txn.put_block(key, record)
        return txn.delete_unreferenced(job.deletes) if job.deletes else None

    def _apply_job(self, txn: StoreTxn, job: WriteJob) -> object:
        """An ``apply`` job in a nested transaction: if it raises, its changes are dropped and
        the exception is its result (a full map still aborts the whole batch)."""
        outer, usage, freed = txn.txn, dict(txn.usage), len(txn.freed)
        segments = txn.segments.copy() if txn.segments is not None else None
        try:
            with self._env.begin(write=True, parent=outer, db=self._blocks) as child:
                txn.txn = child
                return job.apply(txn)
        except lmdb.MapFullError:
            raise
        except Exception as error:
            txn.usage, txn.segments = usage, segments
            del txn.freed[freed:]
            return error
        finally:
            txn.txn = outer

    def _full_error(self, job: WriteJob, why: str) -> TierFullError:
        if job.apply is not None:
            return TierFullError(f"disk tier {self.path}: cannot update the store: {why}, capacity {self.capacity_bytes} bytes")
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
            self._encoder.close()  # its queued puts reach the writer first
            if self._writer is not None:
                self._writer.close()  # first: a submit from now on raises TierError instead of hanging
            self._closed = True
            if self.segment_writer is not None:
                self.segment_writer.close()
            self.segment_reader.close()
            self.direct.close()
            self._env.close()
            if self._users is not None:
                os.close(self._users)

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _once(action: Callable[[], None]) -> Callable[[], None]:
    """``action`` made safe to call more than once, from any thread: it runs the first time only."""
    lock, done = threading.Lock(), [False]

    def run() -> None:
        with lock:
            if done[0]:
                return
            done[0] = True
        action()

    return run
