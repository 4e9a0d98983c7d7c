"""A session's block summaries kept together, so that resuming reads them in one pass.

Why: a session's blocks are keyed by hashes, so their ``summaries`` rows lie all over that
B-tree; resuming a 32K-token SmolLM2 conversation looked up 15,360 of them, about one cold 4 KiB
page each (1.2 s on this machine), 256K tokens eight times more. Each commit therefore also
writes the summaries of the blocks it adds as one *run*: a row of the ``sessions`` database

    key   = b"u:" + name + b"\\x00" + u32 BE first block + u32 BE block count   (names never hold a NUL)
    value = xxh3-64 (8 bytes LE) of the rest + header + [layers, count, 2, kv_heads, head_dim]
            in fp16 (a store of format 4 where every value is one; see :mod:`hkv.store.summary_rows`)
            or fp32
    header = u32 first, u32 count, u32 layers, u8 relative frame, u8 value bytes (2 or 4; 0 in
             runs written before format 4: 4), 2 pad, 16-byte xxh3-128 of the block keys covered
             (layer by layer, block by block)

A resume reads the session's runs in key order, each a large value read with O_DIRECT in one
request (:class:`~hkv.store.direct_reads.DirectReader`, all of them in flight together), and
takes the leading blocks they cover without touching the ``summaries`` rows; the rest (a session
written before runs existed, a run that fails its checksum or names other keys) is read per
block as before. Runs are a copy: the per-block rows stay (other sessions and prefix reuse read
them), a run that is wrong or missing costs time, never a wrong summary, and ``hkv sessions
repair`` drops them all (the next commit writes them again). They are deleted with the session,
and a commit that rewrites the session's history deletes the runs past the blocks it keeps.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from ..store.block_store import BlockStore
from ..store.checksum import CHECKSUM_BYTES, checksum
from ..store.summary_rows import summary_payload
from ..store.txn import StoreTxn

RUN_PREFIX = b"u:"
_HEADER = struct.Struct("<IIIBB2x16s")
_VALUE_TYPES = {0: "<f4", 2: "<f2", 4: "<f4"}  # the header's value bytes -> numpy dtype


def run_prefix(name: str) -> bytes:
    return RUN_PREFIX + name.encode() + b"\x00"


def run_key(name: str, first: int, count: int) -> bytes:
    return run_prefix(name) + first.to_bytes(4, "big") + count.to_bytes(4, "big")


def _span(key: bytes) -> tuple[int, int]:
    """``(first block, count)`` of a run row's key."""
    return int.from_bytes(key[-8:-4], "big"), int.from_bytes(key[-4:], "big")


def keys_hash(keys_by_layer: Sequence[Sequence[bytes]], first: int, count: int) -> bytes:
    """xxh3-128 of the block keys ``[first, first + count)`` of every layer, layer by layer."""
    hasher = xxhash.xxh3_128()
    for keys in keys_by_layer:
        hasher.update(b"".join(bytes(key) for key in keys[first : first + count]))
    return hasher.digest()


def encode_run(first: int, keys_by_layer: Sequence[Sequence[bytes]], summaries: torch.Tensor, relative: bool, *,
               compact: bool = False) -> bytes:  # fmt: skip
    """One run row's value: ``summaries`` ``[layers, count, 2, kv_heads, head_dim]`` (any float
    dtype, any device) of blocks ``[first, first + count)``; ``compact``: in fp16 if every value
    is exactly one (the store's ``compact_summaries``)."""
    layers, count = summaries.shape[:2]
    if layers != len(keys_by_layer):
        raise ValueError(f"summaries of {layers} layers for keys of {len(keys_by_layer)}")
    body = summary_payload(summaries, compact)
    value_bytes = 4 if len(body) == 4 * summaries.numel() else 2
    header = _HEADER.pack(first, count, layers, int(relative), value_bytes, keys_hash(keys_by_layer, first, count))
    return checksum(header + body) + header + body


@dataclass(slots=True)
class SummaryRun:
    first: int
    count: int
    layers: int
    relative: bool
    keys_hash: bytes
    values: np.ndarray  # fp16 or fp32 [layers, count, floats per summary], a view of the row's bytes


def decode_run(raw: bytes | bytearray | memoryview, floats: int) -> SummaryRun | None:
    """The run in ``raw`` if intact (length and checksum), else None."""
    view = memoryview(raw)
    if len(view) < CHECKSUM_BYTES + _HEADER.size or checksum(view[CHECKSUM_BYTES:]) != bytes(view[:CHECKSUM_BYTES]):
        return None
    first, count, layers, relative, value_bytes, hashed = _HEADER.unpack_from(view, CHECKSUM_BYTES)
    dtype = _VALUE_TYPES.get(value_bytes)
    body = view[CHECKSUM_BYTES + _HEADER.size :]
    if dtype is None or len(body) != np.dtype(dtype).itemsize * layers * count * floats:
        return None
    values = np.frombuffer(body, dtype=dtype).reshape(layers, count, floats)
    return SummaryRun(first, count, layers, bool(relative), hashed, values)


def run_keys(txn: StoreTxn, name: str) -> list[bytes]:
    """The keys of ``name``'s run rows, in block order (no value read)."""
    prefix = run_prefix(name)
    return [key for key in txn.keys_with_prefix("sessions", prefix) if len(key) == len(prefix) + 8]


def delete_runs(txn: StoreTxn, name: str, *, keep_blocks: int = 0) -> int:
    """Delete ``name``'s runs that reach past its first ``keep_blocks`` blocks; returns the block
    where the kept runs end (the next run must start there)."""
    end = 0
    for key in txn.keys_with_prefix("sessions", run_prefix(name)):
        first, count = _span(key)
        if len(key) != len(run_prefix(name)) + 8 or first != end or first + count > keep_blocks:
            txn.delete("sessions", key)
        else:
            end = first + count
    return end


def put_run(txn: StoreTxn, name: str, first: int, count: int, value: bytes, keep_blocks: int) -> bool:
    """Keep ``name``'s runs within its first ``keep_blocks`` blocks and add ``value`` (the run of
    blocks ``[first, first + count)``) if the kept runs end exactly at ``first``; whether it was added."""
    if delete_runs(txn, name, keep_blocks=keep_blocks) != first:
        return False
    txn.put("sessions", run_key(name, first, count), value)
    return True


def read_runs(store: BlockStore, name: str, keys_by_layer: Sequence[Sequence[bytes]], relative: bool,
              floats: int) -> list[list[np.ndarray]]:  # fmt: skip
    """The summaries of ``name``'s leading blocks that its runs hold: per layer the arrays
    ``[count, floats]`` (fp16 or fp32, as stored) of its runs in block order (none when no run
    counts), each a view of the memory the run was read into, no copy (95 MB of fp16 at 256K
    tokens, whose page faults cost more than the read). A run counts only if intact, in the
    frame asked for, contiguous with the ones before it and naming exactly the record's block
    keys."""
    layers = len(keys_by_layer)
    total = min((len(keys) for keys in keys_by_layer), default=0)
    runs: list[SummaryRun] = []
    covered = 0
    with store.reading(buffers=True) as txn:
        keys = [key for key in run_keys(txn, name) if sum(_span(key)) <= total]
        raws = store.read_large_values("sessions", keys, txn, owned=True)  # all read at once, kept past the transaction
        for raw in raws:
            run = None if raw is None else decode_run(raw, floats)
            if (run is None or run.first != covered or run.layers != layers or run.relative != relative
                    or run.first + run.count > total
                    or run.keys_hash != keys_hash(keys_by_layer, run.first, run.count)):  # fmt: skip
                break
            runs.append(run)
            covered += run.count
    return [[run.values[layer] for run in runs] for layer in range(layers)]
