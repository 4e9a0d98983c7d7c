"""The session store's work inside one LMDB transaction (see :mod:`.store`).

Reads run in any thread; the functions that write run in the disk writer's thread, inside the
nested transaction of an ``apply`` job, and must depend only on their arguments and what they
read (a job may run twice after a full map).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from ..blocks import BlockKey, BlockLayout, RecordError, decode_into
from ..store.summary_rows import summary_values
from ..store.txn import REFS_BYTES, CommitResult, StoreTxn, summary_key
from .summary_runs import delete_runs
from .records import (
    CorruptSessionError,
    ModelIdentity,
    SessionError,
    SessionInfo,
    SessionNotFoundError,
    SessionRecord,
    VerifyReport,
    check_name,
    tail_key,
)

RECORD_PREFIX = b"s:"  # sessions db: "s:" + name -> record
TAIL_PREFIX = b"t:"  # sessions db: "t:" + name -> tail record
MAX_PROBLEMS = 50  # lines per session in a VerifyReport


def record_key(name: str) -> bytes:
    return RECORD_PREFIX + name.encode()


def tail_record_key(name: str) -> bytes:
    return TAIL_PREFIX + name.encode()


def model_line(identity: ModelIdentity) -> str:
    d = identity.description
    return (
        f"{d.get('class', '?')} {d.get('num_layers', '?')}x{d.get('num_q_heads', '?')}/{d.get('num_kv_heads', '?')}"
        f"x{d.get('head_dim', '?')} {d.get('kv_dtype', '?')} fp={identity.fingerprint[:8]}"
    )


def record_in(txn: StoreTxn, name: str) -> SessionRecord | None:
    raw = txn.get("sessions", record_key(name))
    return None if raw is None else SessionRecord.from_bytes(name, raw)


def session_names(txn: StoreTxn) -> tuple[list[str], list[bytes]]:
    """``(names of the session rows, raw keys of rows whose name is not a valid session name)``:
    a damaged key is reported, never decoded into an error that hides the other sessions."""
    names, bad = [], []
    for key, _ in txn.items("sessions", RECORD_PREFIX):
        try:
            names.append(check_name(key[len(RECORD_PREFIX) :].decode()))
        except (UnicodeDecodeError, SessionError):
            bad.append(key)
    return names, bad


def records_by_use(txn: StoreTxn) -> list[SessionRecord]:
    """The sessions whose records decode, least recently used first."""
    records = []
    for name in session_names(txn)[0]:
        try:
            records.append(SessionRecord.from_bytes(name, txn.get("sessions", record_key(name))))
        except SessionError:
            continue
    return sorted(records, key=lambda record: record.last_used)


def info_in(txn: StoreTxn, name: str) -> SessionInfo:
    record = record_in(txn, name)
    if record is None:
        raise SessionNotFoundError(f"no session {name!r}")
    keys = record.key_digests()
    sizes = txn.found("keys", keys)  # no block data is read
    stored = sum(int.from_bytes(size, "little") for size in sizes.values())
    shared = sum(int.from_bytes(count, "little") > 1 for count in txn.found("refs", list(sizes)).values())
    missing = len(set(keys)) - len(sizes)
    tail = txn.get("sessions", tail_record_key(name))
    return SessionInfo(
        name=name, tokens=len(record.token_ids), kv_tokens=record.kv_tokens, kv_blocks=record.kv_blocks,
        num_layers=record.num_layers, stored_bytes=stored + (len(tail) if tail is not None else 0), shared_blocks=shared,
        missing_blocks=missing, model=model_line(record.identity), created=record.created, updated=record.updated,
        last_used=record.last_used, commits=record.commits,
    )  # fmt: skip


def commit_in(
    txn: StoreTxn, record: SessionRecord, wanted: list[bytes], summaries: list[tuple[bytes, bytes, bytes]],
    tail: bytes | None, now: float,
) -> tuple[CommitResult, SessionRecord]:  # fmt: skip
    """The commit transaction: checks, refs +/- against the previous record, summaries, tail,
    record. Reads only its arguments and the transaction (it may run twice)."""
    name = record.name
    previous = record_in(txn, name)
    common = common_blocks(previous, record) if previous is not None else 0
    added = record.key_digests(common)
    removed = previous.key_digests(common) if previous is not None else []
    stray = set(added) - set(wanted)
    if stray:
        raise SessionError(f"session {name!r}: {len(stray)} block keys do not match the record's token ids")
    # The blocks of the common prefix are the previous commit's: counted in refs, so no disk
    # eviction deleted them; only the newly referenced ones are looked up (O(new) per commit).
    present = txn.found("keys", added)
    missing = len(added) - len(present)
    if missing:
        raise SessionError(
            f"session {name!r}: cannot commit: {missing} of {len(added)} newly referenced blocks are not in the store "
            "(their writes failed, or they were deleted meanwhile: a full disk, or `hkv sessions gc` run while this process wrote)"
        )
    result = CommitResult()
    counts = {key: int.from_bytes(value, "little") for key, value in txn.found("refs", added + removed).items()}
    for key in removed:  # before the increments: a key in both (never, short of a hash collision) nets out
        count = counts.get(key, 0)
        counts[key] = max(0, count - 1)
        if count <= 1:
            result.unreferenced.append(key)
    for key in added:
        count = counts.get(key, 0)
        counts[key] = count + 1
        if count == 0:
            result.newly_referenced.append(key)
    for key in removed:
        if counts[key] == 0:
            txn.set_refs(key, 0)
    try:
        txn.put_many("refs", [(key, counts[key].to_bytes(REFS_BYTES, "little")) for key in dict.fromkeys(added + removed) if counts[key]])
    except OverflowError:
        raise SessionError(f"session {name!r}: a block's refs count is out of range (u32)") from None
    # summaries: (block key, summary key, value); written only for blocks that are stored
    present.update(txn.found("keys", [key for key, _, _ in summaries if key not in present]))
    txn.put_many("summaries", [(where, value) for key, where, value in summaries if key in present])
    if tail is None:
        txn.delete("sessions", tail_record_key(name))
    else:
        txn.put("sessions", tail_record_key(name), tail)
    delete_runs(txn, name, keep_blocks=common)  # runs past the kept history name other keys now
    stamped = dataclasses.replace(
        record, commits=(previous.commits if previous else 0) + 1, created=previous.created if previous else now,
        updated=now, last_used=now,
    )  # fmt: skip
    txn.put("sessions", record_key(name), stamped.to_bytes())
    return result, stamped


def common_blocks(previous: SessionRecord, record: SessionRecord) -> int:
    """Leading blocks whose keys the two records share (same model, layout, layers and tokens)."""
    if (previous.identity.fingerprint, previous.num_layers, previous.block_tokens) != (
        record.identity.fingerprint, record.num_layers, record.block_tokens
    ):  # fmt: skip
        return 0
    n = min(previous.kv_blocks, record.kv_blocks) * record.block_tokens
    differ = np.flatnonzero(previous.token_ids[:n] != record.token_ids[:n])
    same = n if differ.size == 0 else int(differ[0])
    return same // record.block_tokens


def drop_references(txn: StoreTxn, keys: list[bytes], in_use: Callable[[bytes], bool], result: CommitResult) -> None:
    """Decrement refs of ``keys``; a block reaching 0 is deleted unless ``in_use`` (then kept, unreferenced)."""
    for key in keys:
        count = txn.refs(key)
        if count == 0:
            continue  # not counted (a store edited by hand): nothing to undo
        txn.set_refs(key, count - 1)
        if count > 1:
            continue
        if in_use(key):
            result.unreferenced.append(key)
            continue
        freed = txn.delete_block(key)
        if freed:
            result.deleted.append(key)
            result.freed_bytes += freed


def decode_tail(txn: StoreTxn, name: str, out: torch.Tensor) -> None:
    """Decode ``name``'s tail record into ``out`` ``[layers * 2, kv_heads, tail, head_dim]`` (CPU)."""
    decode_tail_value(txn.get("sessions", tail_record_key(name)), name, out)


def decode_tail_value(raw: bytes | memoryview | None, name: str, out: torch.Tensor) -> None:
    """:func:`decode_tail` of the tail record's value as read (None: missing)."""
    if raw is None:
        raise CorruptSessionError(f"session {name!r}: its tail record is missing")
    try:
        decode_into(raw, out, tail_key(name), where=f"session {name!r} tail")
    except RecordError as error:
        raise CorruptSessionError(str(error)) from None


def verify_session(
    txn: StoreTxn, name: str, layout: BlockLayout, checked: dict[bytes, str | None], report: VerifyReport,
    users: Counter[bytes] | None = None,
) -> list[str]:  # fmt: skip
    """Problems of one session (record, tail, blocks, summaries, refs), at most MAX_PROBLEMS lines.
    ``users``: when every session is verified, how many reference each block (refs must not be
    fewer: a delete could then free a block another session still uses)."""
    problems: list[str] = []
    try:
        record = record_in(txn, name)
    except SessionError as error:
        return [str(error)]
    if record.tail_tokens:
        scratch = torch.empty(record.num_layers * 2, layout.kv_heads, record.tail_tokens, layout.head_dim, dtype=layout.dtype)
        try:
            decode_tail(txn, name, scratch)
        except CorruptSessionError as error:
            problems.append(str(error))
    block = torch.empty(layout.shape, dtype=layout.dtype)
    floats = layout.summary_floats
    for i, key in enumerate(record.key_digests()):
        where = f"block {i // record.num_layers} layer {i % record.num_layers} ({key.hex()})"
        if key not in checked:
            try:
                raw = txn.record(key) if txn.record_nbytes(key) is not None else None
            except RecordError as error:  # a segment file gone
                raw, checked[key] = b"", str(error).split(": ", 1)[-1]
            if raw is None:
                checked[key] = "is missing from the store"
            elif key not in checked:
                try:
                    decode_into(raw, block, BlockKey(key), where="record")
                    checked[key] = None
                except RecordError as error:
                    checked[key] = str(error).removeprefix("record: ")
                report.checked_blocks += 1
                report.checked_bytes += len(raw)
            if checked[key] is None and all(
                summary_values(txn.get("summaries", summary_key(key, relative)), floats) is None for relative in (False, True)
            ):  # a remap block with only a stored-frame summary (an older store) is intact; remap re-prefills it
                checked[key] = "summary missing or corrupt"
            refs = txn.refs(key)
            if checked[key] is None and refs == 0:
                checked[key] = "has refs 0 although the session references it"
            elif checked[key] is None and users is not None and refs < users[key]:  # (more: a leak, not a danger)
                checked[key] = f"has refs {refs} but {users[key]} sessions reference it"
        if checked[key] is not None:
            problems.append(f"{where}: {checked[key]}")
    if len(problems) > MAX_PROBLEMS:
        problems[MAX_PROBLEMS:] = [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    return [f"session {name!r}: {line}" if not line.startswith("session") else line for line in problems]
