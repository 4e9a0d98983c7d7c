"""Store maintenance on a store held alone: garbage collection and the block half of repair.

Both run on a :class:`~hkv.store.block_store.BlockStore` opened ``exclusive`` (no other process
has it open for writing: a block no session references may be one a running process is about
to commit). Work is done in write transactions of at most :data:`CHUNK` blocks, each marked as
freeing (on a full disk it may use the store's reserve file, :mod:`.space`), so a store of any
size is maintained in bounded memory and a kill -9 between transactions leaves a consistent
store: running the command again finishes the job.

:func:`collect_garbage` deletes the blocks whose ``refs`` count is 0 (the orphans a failed turn
leaves, the prefix cache of ``store.persist``). :func:`repair_blocks` makes the ``blocks``
records, the ``keys`` index, the ``summaries`` rows and the ``usage`` row agree: a record that
fails its checks is dropped (whatever references it), a good record missing from the index is
indexed again, an index entry or summary without a record is dropped, the usage row is
recomputed. A record in a segment file (store format 3) that fails its checks, or whose file is
gone, has its index entry dropped; the ``meta/segments`` row is recomputed from the index. It
never deletes a record that checks out. Both end with a compaction of the segment files
(:mod:`.compaction`: the dead bytes of deleted records given back, files no entry names deleted). The session half is
:mod:`hkv.sessions.repair`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..blocks import KEY_BYTES, BlockKey, RecordError, decode_into
from ..errors import StoreError
from .block_store import BlockStore, parse_usage, usage_from_index
from .compaction import GC_DEAD_SHARE, CompactionReport
from .segment_rows import ROW as SEGMENTS_ROW
from .segment_rows import SegmentStats, stats_from_index
from .segments import Place, entry_length
from .txn import StoreTxn

CHUNK = 256  # blocks per write transaction (bounded dirty pages: fits the reserve on a full disk)


@dataclass(slots=True)
class GcReport:
    """What :func:`collect_garbage` did: blocks deleted and their record bytes, and the
    compaction of the segment files that followed."""

    deleted: int = 0
    freed_bytes: int = 0
    compaction: CompactionReport = field(default_factory=CompactionReport)


@dataclass(slots=True)
class BlockRepair:
    """What :func:`repair_blocks` found and did; ``problems``: one line per thing fixed or dropped."""

    checked: int = 0  # records read and checked
    dropped: list[bytes] = field(default_factory=list)  # keys of records that failed their checks
    problems: list[str] = field(default_factory=list)


def _chunks(keys: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(keys), CHUNK):
        yield keys[start : start + CHUNK]


def _require_alone(store: BlockStore, what: str) -> None:
    if not store.exclusive:
        raise StoreError(f"{store.path}: {what} needs the store opened exclusive (no other writer)")


def collect_garbage(store: BlockStore) -> GcReport:
    """Delete every block no committed session references; a chunk at a time."""
    _require_alone(store, "gc")
    with store.reading() as txn:
        candidates = [key for key in txn.keys("keys") if not txn.refs(key)]
    report = GcReport()

    def job(chunk: list[bytes]):
        def run(txn: StoreTxn) -> tuple[int, int]:
            result = txn.delete_unreferenced(chunk)  # refs re-read in the transaction
            return len(result.deleted), result.freed_bytes

        return run

    for chunk in _chunks(candidates):
        deleted, freed = store.apply(job(chunk), frees=True)
        report.deleted += deleted
        report.freed_bytes += freed
    if store.segment_writer is not None or store.format_version >= 3:
        report.compaction = store.compact_segments(GC_DEAD_SHARE, current_too=True)
    return report


def _check_records(store: BlockStore, keys: list[bytes], report: BlockRepair) -> tuple[list[tuple[bytes, str]], dict[bytes, int]]:
    """``(key, problem)`` of the records of ``keys`` that fail their checks (header, key, length,
    checksum), and the length of each record read."""
    scratch = torch.empty(store.layout.shape, dtype=store.layout.dtype)
    bad, lengths = [], {}
    with store.reading(buffers=True) as txn:
        for key in keys:
            raw = txn.get("blocks", key)
            if raw is None:
                continue
            report.checked += 1
            lengths[key] = len(raw)
            try:
                decode_into(raw, scratch, BlockKey(key), where="record")
            except RecordError as error:
                bad.append((key, str(error).removeprefix("record: ")))
    return bad, lengths


def _drop_records(txn: StoreTxn, keys: list[bytes]) -> None:
    """Delete records, their index entries and summaries (whatever their refs)."""
    for key in keys:
        txn.delete_block(key)
        txn.delete("blocks", key)  # a record the index did not list


def _set_lengths(txn: StoreTxn, lengths: dict[bytes, int]) -> None:
    """Index records again (key -> length), the usage row following each entry."""
    for key, length in lengths.items():
        old = txn.record_nbytes(key)
        txn.put("keys", key, length.to_bytes(8, "little"))
        txn.usage["used_bytes"] += length - (old or 0)
        txn.usage["blocks"] += old is None


def _delete_rows(db: str, keys: list[bytes]):
    def run(txn: StoreTxn) -> None:
        for key in keys:
            old = txn.record_nbytes(key) if db == "keys" else None
            if txn.delete(db, key) and old is not None:  # the usage row follows the index
                txn.usage["used_bytes"] -= old
                txn.usage["blocks"] -= 1

    return run


def repair_blocks(store: BlockStore) -> BlockRepair:
    """Make records, key index, summaries and usage agree (see the module docstring)."""
    _require_alone(store, "repair")
    report = BlockRepair()
    with store.reading() as txn:
        records = txn.keys("blocks")
        entries = {bytes(key): bytes(entry) for key, entry in txn.items("keys")}
        summaries = txn.keys("summaries")
        usage_was = parse_usage(txn.get("meta", b"usage"))
        usage_then = usage_from_index(txn.txn, txn.db["keys"])
    placed = {key: _place_or_none(entry) for key, entry in entries.items() if len(entry) != 8}
    indexed = {key: entry_length(entry) for key, entry in entries.items() if key not in placed}
    stray = [key for key in records if key in placed]  # an LMDB record under a segment entry: the segment's wins
    records = [key for key in records if key not in placed]
    if stray:
        store.apply(_delete_rows("blocks", stray), frees=True)
        report.problems.append(f"{len(stray)} LMDB records of blocks indexed in segment files: dropped")
    if usage_was != usage_then:
        said = usage_was if usage_was is not None else "nothing readable"
        report.problems.append(f"the meta/usage row said {said}, the key index {usage_then}: recomputed")
    for chunk in _chunks(records):
        bad, lengths = _check_records(store, chunk, report)
        if bad:
            store.apply(lambda txn, keys=[key for key, _ in bad]: _drop_records(txn, keys), frees=True)
            report.dropped += [key for key, _ in bad]
            report.problems += [f"block {key.hex()}: {problem}: dropped" for key, problem in bad]
        dropped = {key for key, _ in bad}
        wrong = {key: n for key, n in lengths.items() if key not in dropped and indexed.get(key) != n}
        if wrong:
            store.apply(lambda txn, wrong=wrong: _set_lengths(txn, wrong))
            report.problems += [
                f"block {key.hex()}: " + ("not in the key index: indexed again" if key not in indexed else "wrong length in the key index: fixed")
                for key in wrong
            ]  # fmt: skip
    seg_good = _check_segment_records(store, placed, report)
    stored = set(records) - set(report.dropped) | seg_good
    stale = [key for key in indexed if key not in stored]
    for chunk in _chunks(stale):
        store.apply(_delete_rows("keys", chunk), frees=True)
    dropped = set(report.dropped)
    report.problems += [f"block {key.hex()}: in the key index without a record: entry dropped" for key in stale if key not in dropped]
    had = set(records) | set(placed)  # (a dropped record's summaries went with it)
    lone = [key for key in summaries if key[:KEY_BYTES] not in had]
    for chunk in _chunks(lone):
        store.apply(_delete_rows("summaries", chunk), frees=True)
    if lone:
        report.problems.append(f"{len(lone)} summaries without a block: dropped")
    store.apply(_recount_usage)
    if store.format_version >= 3:
        store.apply(_recount_segments)
        done = store.compact_segments(GC_DEAD_SHARE, current_too=True)
        if done.removed:
            report.problems.append(f"{done.removed} segment files no index entry named: deleted")
    return report


def _place_or_none(entry: bytes) -> Place | None:
    try:
        return Place.decode(entry)
    except ValueError:
        return None  # a malformed entry: dropped as a record that fails


def _check_segment_records(store: BlockStore, placed: dict[bytes, Place | None], report: BlockRepair) -> set[bytes]:
    """Check every segment record the index names (a chunk at a time); drop the index entries
    of those that fail (or whose file is gone); the keys that check out."""
    good: set[bytes] = set()
    scratch = torch.empty(store.layout.shape, dtype=store.layout.dtype)
    for chunk in _chunks(sorted(placed)):
        bad: list[tuple[bytes, str]] = []
        with store.reading() as txn:
            for key in chunk:
                report.checked += 1
                if placed[key] is None:
                    bad.append((key, "a malformed key index entry"))
                    continue
                try:
                    decode_into(txn.record(key), scratch, BlockKey(key), where="record")
                    good.add(key)
                except RecordError as error:
                    bad.append((key, str(error).split(": ", 1)[-1].removeprefix("record: ")))
        if bad:
            store.apply(lambda txn, keys=[key for key, _ in bad]: _drop_records(txn, keys), frees=True)
            report.dropped += [key for key, _ in bad]
            report.problems += [f"block {key.hex()}: {problem}: dropped" for key, problem in bad]
    return good


def _recount_segments(txn: StoreTxn) -> None:
    """Set the segments row to what the key index says (keeping the next id)."""
    old = SegmentStats.parse(txn.get("meta", SEGMENTS_ROW))
    fresh = stats_from_index(txn.txn, txn.db["keys"], old.next if old is not None else 1)
    fresh.next = max(fresh.next, max(fresh.live, default=0) + 1)
    txn.segments = fresh
    txn.put("meta", SEGMENTS_ROW, fresh.to_bytes())


def _recount_usage(txn: StoreTxn) -> None:
    """Set the usage row to what the key index sums to (the store writes ``txn.usage`` as the
    row when the transaction commits)."""
    actual = usage_from_index(txn.txn, txn.db["keys"])
    txn.usage.clear()
    txn.usage.update(actual)
