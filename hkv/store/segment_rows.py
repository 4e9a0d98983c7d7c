"""The ``meta/segments`` row: per segment, the bytes and number of records the index names.

Written in the same transaction as every index change that adds or removes a segment record
(like ``meta/usage``), so it is exact after a kill -9: a segment's dead bytes are its file size
less its live bytes, which is what compaction (:mod:`.compaction`) decides on without scanning
the index. ``next`` is the lowest segment id never used (ids are not reused: a reader holding an
old snapshot must never find another segment under an id it knows). A missing or garbled row is
recomputed from the index (:func:`stats_from_index`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import lmdb

from .segments import Place

ROW = b"segments"


@dataclass(slots=True)
class SegmentStats:
    """``live``: segment id -> [record bytes, records] the index names; ``next``: the next id."""

    next: int = 1
    live: dict[int, list[int]] = field(default_factory=dict)

    def add(self, place: Place) -> None:
        entry = self.live.setdefault(place.segment, [0, 0])
        entry[0] += place.length
        entry[1] += 1
        self.next = max(self.next, place.segment + 1)

    def remove(self, place: Place) -> None:
        entry = self.live.get(place.segment)
        if entry is None:
            return
        entry[0] -= place.length
        entry[1] -= 1
        if entry[1] <= 0:
            del self.live[place.segment]

    def copy(self) -> SegmentStats:
        return SegmentStats(self.next, {k: list(v) for k, v in self.live.items()})

    def to_bytes(self) -> bytes:
        return json.dumps({"next": self.next, "live": {str(k): v for k, v in sorted(self.live.items())}}).encode()

    @classmethod
    def parse(cls, raw: bytes | memoryview | None) -> SegmentStats | None:
        """The row, None if it is missing or not a well-formed row."""
        if raw is None:
            return None
        try:
            value = json.loads(bytes(raw))
            stats = cls(int(value["next"]), {int(k): [int(v[0]), int(v[1])] for k, v in value["live"].items()})
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
        if stats.next < 1 or any(k < 1 or k >= stats.next or v[0] < 0 or v[1] < 1 for k, v in stats.live.items()):
            return None
        return stats


def stats_from_index(txn: lmdb.Transaction, index: object, next_id: int = 1) -> SegmentStats:
    """The row as the ``keys`` index says it should be (a scan of the index; no record read)."""
    stats = SegmentStats(next_id)
    for _, raw in txn.cursor(db=index):
        try:
            place = Place.decode(raw)
        except ValueError:
            continue
        if place is not None:
            stats.add(place)
    return stats


def read_stats(txn: lmdb.Transaction, meta: object, index: object) -> SegmentStats:
    """The row; recomputed from the index when missing or garbled."""
    stats = SegmentStats.parse(txn.get(ROW, db=meta))
    return stats if stats is not None else stats_from_index(txn, index)
