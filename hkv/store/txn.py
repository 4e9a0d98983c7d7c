"""A view of one LMDB transaction of the block store: its named databases and its usage record.

The store's writer thread hands a :class:`StoreTxn` to each ``apply`` job (a nested write
transaction, see :meth:`hkv.store.block_store.BlockStore.submit_apply`), and readers get one from
:meth:`hkv.store.block_store.BlockStore.reading`. It knows the format-2 conventions every writer must keep:
a block is a ``keys`` entry (record length, u64 LE; in format 3 maybe followed by the record's
place in a segment file, :class:`~hkv.store.segments.Place`) plus its record (in the ``blocks``
database, or at that place) and maybe a ``summaries`` entry; ``refs`` holds u32 LE counts, absent meaning 0; ``usage`` (record bytes and
count) changes with every block put or deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lmdb

from .segment_rows import SegmentStats
from .segments import Place, entry_length

REFS_BYTES = 4  # u32 little-endian


@dataclass(slots=True)
class DeleteResult:
    """What a block delete did. ``deleted``: keys whose records are gone; ``kept``: keys skipped
    because a committed session references them (refs > 0); ``freed_bytes``: record bytes freed.
    Keys that were not stored are in neither list."""

    deleted: list[bytes] = field(default_factory=list)
    kept: list[bytes] = field(default_factory=list)
    freed_bytes: int = 0


@dataclass(slots=True)
class CommitResult:
    """What a session commit / delete / reclaim changed in the ``refs`` rows and the blocks, for
    the tier manager's in-process view (:meth:`hkv.tiers.manager.TierManager.apply_store_changes`)."""

    newly_referenced: list[bytes] = field(default_factory=list)  # keys whose refs went 0 -> 1
    unreferenced: list[bytes] = field(default_factory=list)  # keys whose refs went to 0 and were kept
    deleted: list[bytes] = field(default_factory=list)  # keys whose blocks were deleted from the store
    freed_bytes: int = 0
    sessions: list[str] = field(default_factory=list)  # reclaim: sessions whose KV was dropped


RELATIVE_SUMMARY_SUFFIX = b"r"  # summaries db: block key + this -> the block's relative-frame summary


def summary_key(key: bytes, relative: bool = False) -> bytes:
    """Key of a block's summary in the ``summaries`` database: the block key for summaries of the
    keys as stored (attention.positions = "original"), the block key + ``b"r"`` for summaries of
    the keys rotated back to the block's first position ("remap": docs/positions.md). A block
    shared by sessions of both kinds has both."""
    return key + RELATIVE_SUMMARY_SUFFIX if relative else key


class StoreTxn:
    """One transaction of the store. ``txn``: the LMDB transaction; ``db``: database name
    (``"blocks"``, ``"keys"``, ``"meta"``, ``"refs"``, ``"summaries"``, ``"sessions"``) -> handle,
    or None for a database a read-only format-1 store lacks; ``usage``: ``{"used_bytes",
    "blocks"}`` as this transaction will commit it (None in a read transaction); ``written``:
    bytes of keys and values put so far (what the store's mapped pages grow by, roughly);
    ``reads``: records looked up by key so far (each maps at least one page of the store);
    ``segments``: the ``meta/segments`` row as this transaction will commit it (None: not
    loaded, or a read transaction); ``read_place``: reads a segment record (``(key, place)`` ->
    its bytes; CorruptRecordError naming the key when its file is gone)."""

    __slots__ = ("txn", "db", "usage", "written", "reads", "last_db", "segments", "read_place", "freed")

    def __init__(
        self, txn: lmdb.Transaction, db: dict[str, object], usage: dict[str, int] | None,
        segments: SegmentStats | None = None, read_place: Callable[[bytes, Place], bytes] | None = None,
    ) -> None:  # fmt: skip
        self.txn, self.db, self.usage = txn, db, usage
        self.segments, self.read_place = segments, read_place
        self.freed: list[Place] = []  # segment places this transaction stopped naming (dead once it is durable)
        self.written = 0
        self.reads = 0
        self.last_db: str | None = None  # the database read last (named when a read finds damage)

    # -- reading ----------------------------------------------------------------------------------
    def get(self, db: str, key: bytes) -> bytes | memoryview | None:
        """The value under ``key`` in database ``db`` (None if absent or the database is)."""
        handle = self.db.get(db)
        self.reads += 1
        self.last_db = db
        return None if handle is None else self.txn.get(key, db=handle)

    def items(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes | memoryview]]:
        """``(key, value)`` of database ``db`` whose key starts with ``prefix``, in key order."""
        handle = self.db.get(db)
        self.last_db = db
        if handle is None:
            return
        cursor = self.txn.cursor(db=handle)
        if not (cursor.set_range(prefix) if prefix else cursor.first()):
            return
        for key, value in cursor:
            key = bytes(key)
            if not key.startswith(prefix):
                return
            yield key, value

    def keys_with_prefix(self, db: str, prefix: bytes) -> list[bytes]:
        """The keys of database ``db`` that start with ``prefix``, in key order (no value is read)."""
        handle = self.db.get(db)
        self.last_db = db
        if handle is None:
            return []
        cursor = self.txn.cursor(db=handle)
        if not cursor.set_range(prefix):
            return []
        out = []
        for key in cursor.iternext(keys=True, values=False):
            key = bytes(key)
            if not key.startswith(prefix):
                break
            out.append(key)
        return out

    def keys(self, db: str) -> list[bytes]:
        """Every key of database ``db``, in key order (no value is read)."""
        handle = self.db.get(db)
        self.last_db = db
        if handle is None:
            return []
        return [bytes(key) for key in self.txn.cursor(db=handle).iternext(keys=True, values=False)]

    def record_nbytes(self, key: bytes) -> int | None:
        """Bytes of the block record under ``key`` (from the ``keys`` index; no record page read)."""
        size = self.get("keys", key)
        return None if size is None else entry_length(size)

    def place(self, key: bytes) -> Place | None:
        """Where block ``key``'s record is in a segment file; None if it is not stored or is in
        the ``blocks`` database. ValueError for a malformed index entry."""
        entry = self.get("keys", key)
        return None if entry is None else Place.decode(entry)

    def record(self, key: bytes) -> bytes | memoryview | None:
        """Block ``key``'s record bytes, wherever they are (None if not stored); not checked."""
        entry = self.get("keys", key)
        place = Place.decode(entry) if entry is not None and len(entry) != 8 else None
        if place is None:
            return self.get("blocks", key)
        if self.read_place is None:
            raise ValueError("this transaction cannot read segment records")
        return self.read_place(key, place)

    def refs(self, key: bytes) -> int:
        """How many committed sessions reference block ``key``."""
        raw = self.get("refs", key)
        return 0 if raw is None else int.from_bytes(raw, "little")

    def found(self, db: str, keys: list[bytes]) -> dict[bytes, bytes | memoryview]:
        """``key -> value`` for those of ``keys`` that are in database ``db`` (a tight loop: a
        commit of a long session checks 15K keys; ``Cursor.getmulti`` is no faster, and much
        slower with ``buffers``)."""
        handle = self.db.get(db)
        self.last_db = db
        if handle is None or not keys:
            return {}
        get, found = self.txn.get, {}
        self.reads += len(keys)
        for key in sorted(keys):  # sorted: neighbouring keys share B-tree pages
            value = get(key, db=handle)
            if value is not None:
                found[key] = value
        return found

    # -- writing (write transactions only) --------------------------------------------------------
    def put(self, db: str, key: bytes, value: bytes | bytearray | memoryview) -> None:
        self.txn.put(key, value, db=self.db[db])
        self.written += len(key) + len(value)

    def delete(self, db: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self.db[db])

    @staticmethod
    def encode_refs(count: int, key: bytes = b"") -> bytes:
        """A refs value (u32 LE); ValueError naming the block when out of range."""
        if count < 0 or count >= 2 ** (8 * REFS_BYTES):
            raise ValueError(f"refs count {count} of block {key.hex()} out of range")
        return count.to_bytes(REFS_BYTES, "little")

    def set_refs(self, key: bytes, count: int) -> None:
        """Store a refs count (0 removes the entry)."""
        value = self.encode_refs(count, key)
        if count:
            self.put("refs", key, value)
        else:
            self.txn.delete(key, db=self.db["refs"])

    def put_many(self, db: str, items: list[tuple[bytes, bytes]]) -> None:
        """Put ``(key, value)`` pairs in database ``db``, replacing existing values."""
        if items:
            self.txn.cursor(db=self.db[db]).putmulti(sorted(items))
            self.written += sum(len(key) + len(value) for key, value in items)

    def _forget_place(self, key: bytes) -> int | None:
        """The old record's bytes (None if none); a segment place it had leaves the segments row."""
        entry = self.get("keys", key)
        if entry is None:
            return None
        if len(entry) != 8:
            try:
                place = Place.decode(entry)
            except ValueError:  # a malformed entry (repair drops it)
                return entry_length(entry)
            if self.segments is not None:
                self.segments.remove(place)
            self.freed.append(place)
            return place.length
        return entry_length(entry)

    def put_block(self, key: bytes, record: bytes | bytearray) -> int:
        """Store a block record (replacing one under the same key); returns the change in used bytes."""
        old = self._forget_place(key)
        self.txn.put(key, record, db=self.db["blocks"])
        self.txn.put(key, len(record).to_bytes(8, "little"), db=self.db["keys"])
        self.written += len(record) + 2 * len(key) + 8
        self.usage["used_bytes"] += len(record) - (old or 0)
        self.usage["blocks"] += old is None
        return len(record) - (old or 0)

    def put_place(self, key: bytes, place: Place) -> int:
        """Index a record written at ``place`` of a segment (durable already), replacing any
        record under ``key``; returns the change in used bytes."""
        entry = self.get("keys", key)
        old = self._forget_place(key)
        if entry is not None and len(entry) == 8:
            self.txn.delete(key, db=self.db["blocks"])
        self.txn.put(key, place.encode(), db=self.db["keys"])
        self.segments.add(place)
        self.written += 2 * len(key) + 20
        self.usage["used_bytes"] += place.length - (old or 0)
        self.usage["blocks"] += old is None
        return place.length - (old or 0)

    def delete_block(self, key: bytes) -> int:
        """Delete a block record, its index entry and its summary, whatever its refs count (the
        caller decided); returns the record bytes freed (0 if it was not stored). A segment
        record's bytes stay in its file until compaction."""
        entry = self.get("keys", key)
        old = self._forget_place(key)
        if old is None:
            return 0
        if len(entry) == 8:
            self.txn.delete(key, db=self.db["blocks"])
        self.txn.delete(key, db=self.db["keys"])
        if self.db.get("summaries") is not None:
            self.txn.delete(key, db=self.db["summaries"])
            self.txn.delete(key + RELATIVE_SUMMARY_SUFFIX, db=self.db["summaries"])
        self.usage["used_bytes"] -= old
        self.usage["blocks"] -= 1
        return old

    def delete_unreferenced(self, keys: list[bytes]) -> DeleteResult:
        """Delete the blocks of ``keys`` whose refs count is 0; the others are kept."""
        result = DeleteResult()
        for key in dict.fromkeys(keys):
            if self.refs(key):
                if self.record_nbytes(key) is not None:
                    result.kept.append(key)
                continue
            freed = self.delete_block(key)
            if freed:
                result.deleted.append(key)
                result.freed_bytes += freed
        return result
