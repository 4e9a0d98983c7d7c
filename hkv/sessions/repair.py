"""``hkv sessions repair``: rebuild what the records allow, drop what they do not, report each.

Runs on a :class:`~hkv.sessions.store.SessionStore` whose store is opened ``exclusive`` (no
other process writes it), after the block half (:func:`hkv.store.maintenance.repair_blocks`:
bad records dropped, key index, summaries and usage made to agree). Then, a transaction per
step (a kill -9 between them leaves a consistent store; running repair again finishes):

1. session rows whose key is not a valid session name, or whose record does not decode, are
   deleted with their tails (nothing in them can be trusted);
2. a session whose tail does not decode, or one of whose blocks (or its summary) is missing, has
   its KV dropped: its token ids stay (``kv_tokens = 0``), so its next resume prefills them and
   the conversation goes on token-exact. Its blocks are kept (unreferenced, for ``gc``);
3. the ``refs`` counts are recounted from the sessions left.

No block record that checks out is ever deleted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..store.maintenance import BlockRepair, repair_blocks
from ..store.summary_rows import summary_values
from ..store.txn import CommitResult, StoreTxn, summary_key
from .records import CorruptSessionError, SessionError, SessionRecord
from .summary_runs import RUN_PREFIX
from .rows import RECORD_PREFIX, TAIL_PREFIX, decode_tail, drop_references, record_key, session_names, tail_record_key
from .store import SessionStore


@dataclass(slots=True)
class RepairReport:
    """What repair found and did. ``problems``: one line per thing fixed or dropped (empty: the
    store was sound); ``checked_blocks``: block records read and checked."""

    checked_blocks: int = 0
    problems: list[str] = field(default_factory=list)
    dropped_sessions: list[str] = field(default_factory=list)
    reset_sessions: list[str] = field(default_factory=list)  # KV dropped, tokens kept

    @property
    def ok(self) -> bool:
        return not self.problems


def _session_problem(txn: StoreTxn, record: SessionRecord, store: SessionStore) -> str | None:
    """Why ``record``'s KV cannot be resumed (a tail that does not decode, a block or summary
    missing), None if it can. Reads no block record (the block half checked them)."""
    layout = store.disk.layout
    if record.tail_tokens:
        scratch = torch.empty(record.num_layers * 2, layout.kv_heads, record.tail_tokens, layout.head_dim, dtype=layout.dtype)
        try:
            decode_tail(txn, record.name, scratch)
        except CorruptSessionError as error:
            return str(error)
    keys = record.key_digests()
    present = txn.found("keys", keys)
    if len(present) < len(set(keys)):
        return f"{len(set(keys)) - len(present)} of its {len(set(keys))} blocks are missing"
    floats = layout.summary_floats
    for key in keys:
        if all(summary_values(txn.get("summaries", summary_key(key, relative)), floats) is None for relative in (False, True)):
            return f"the summary of block {key.hex()} is missing or corrupt"
    return None


def _drop_rows(keys: list[bytes]):
    def run(txn: StoreTxn) -> None:
        for key in keys:
            txn.delete("sessions", key)
            txn.delete("sessions", TAIL_PREFIX + key[len(RECORD_PREFIX) :])

    return run


def _reset(record: SessionRecord):
    """Drop the session's KV, keep its tokens; its blocks lose its reference but stay (gc's)."""

    def run(txn: StoreTxn) -> None:
        drop_references(txn, record.key_digests(), lambda key: True, CommitResult())
        txn.delete("sessions", tail_record_key(record.name))
        record.kv_tokens = record.kv_blocks = record.tail_tokens = 0
        txn.put("sessions", record_key(record.name), record.to_bytes())

    return run


def _drop_summary_runs(txn: StoreTxn) -> None:
    for key in txn.keys_with_prefix("sessions", RUN_PREFIX):
        txn.delete("sessions", key)


def _recount_refs(txn: StoreTxn) -> int:
    """Set every ``refs`` count to the number of sessions referencing the block; how many changed."""
    users: Counter[bytes] = Counter()
    for name in session_names(txn)[0]:
        try:
            users.update(SessionRecord.from_bytes(name, txn.get("sessions", record_key(name))).key_digests())
        except SessionError:
            continue
    stored = {key: int.from_bytes(value, "little") for key, value in txn.items("refs")}
    changed = 0
    for key in set(stored) | set(users):
        if stored.get(key, 0) != users[key]:
            changed += 1
            txn.set_refs(key, users[key])
    return changed


def repair(store: SessionStore) -> RepairReport:
    """Repair the store of ``store`` (opened exclusive); see the module docstring."""
    store.disk.check_pages()  # damaged B-tree pages cannot be rebuilt from records: StoreDamagedError
    blocks: BlockRepair = repair_blocks(store.disk)
    report = RepairReport(checked_blocks=blocks.checked, problems=list(blocks.problems))
    with store.disk.reading() as txn:
        names, bad = session_names(txn)
        records: list[SessionRecord] = []
        undecodable: list[str] = []
        for name in names:
            try:
                records.append(SessionRecord.from_bytes(name, txn.get("sessions", record_key(name))))
            except SessionError as error:
                undecodable.append(name)
                report.problems.append(f"session {name!r}: {error}: dropped")
        broken = [(record, why) for record in records if record.kv_tokens and (why := _session_problem(txn, record, store))]
    if bad or undecodable:
        store.disk.apply(_drop_rows(bad + [record_key(name) for name in undecodable]), frees=True)
    report.problems += [f"a session row whose name {key[len(RECORD_PREFIX) :]!r} is not a valid session name: dropped" for key in bad]
    report.dropped_sessions = undecodable
    for record, why in broken:
        tokens = len(record.token_ids)
        store.disk.apply(_reset(record), frees=True)
        report.reset_sessions.append(record.name)
        report.problems.append(f"session {record.name!r}: {why}: its KV dropped, its {tokens} tokens kept (the next resume prefills them)")
    store.disk.apply(_drop_summary_runs, frees=True)  # a copy: the next commit of each session writes them again
    changed = store.disk.apply(_recount_refs, frees=True)
    if changed:
        report.problems.append(f"{changed} block refs counts disagreed with the sessions: recounted")
    return report
