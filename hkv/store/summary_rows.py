"""The ``summaries`` rows of the store: each stored block's key summary, checksummed.

Layout (docs/store.md): block key -> xxh3-64 (8 bytes LE) of the rest + ``[2, kv_heads, head_dim]``
(min / max of the block's keys as stored) in fp16 where every value is one (a store of format 4,
:attr:`~hkv.store.block_store.BlockStore.compact_summaries`; :class:`~hkv.attention.selection.
BlockSummaries` rounds its bounds outward to fp16 so that they are), else fp32: the length says
which, and either holds the summary exactly; block key + ``b"r"`` ->
the same of the keys rotated back to the block's first position (the relative frame,
``attention.positions = "remap"``; :func:`~hkv.store.txn.summary_key`). A summary is written
only for a block that is stored, and deleted with it (:meth:`~hkv.store.txn.StoreTxn.delete_block`).

Writers: the attention layer writes a sealed block's summary through with the block
(:meth:`SummaryRows.submit_put`); a session commit writes those that found no block then.
Readers: prefix adoption (:mod:`hkv.attention.prefix`) and ``hkv sessions verify``.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import torch

from ..blocks import BlockKey, BlockLayout
from .block_store import BlockStore
from .checksum import CHECKSUM_BYTES, checksum
from .txn import StoreTxn, summary_key


def summary_values(raw: bytes | memoryview | None, floats: int) -> np.ndarray | None:
    """The values of a summary row if intact (length and checksum), else None: ``<f2`` or
    ``<f4`` as stored (the row's length says which); assigning them to fp32 is exact."""
    if raw is None or len(raw) not in (CHECKSUM_BYTES + 2 * floats, CHECKSUM_BYTES + 4 * floats):
        return None
    view = memoryview(raw)
    if checksum(view[CHECKSUM_BYTES:]) != bytes(view[:CHECKSUM_BYTES]):
        return None
    return np.frombuffer(view[CHECKSUM_BYTES:], dtype="<f2" if len(raw) == CHECKSUM_BYTES + 2 * floats else "<f4")


def summary_payload(values: torch.Tensor, compact: bool) -> bytes:
    """The bytes of fp32 summary values (a CPU tensor, any shape) as a run holds them: fp16 when
    ``compact`` and every value is exactly an fp16 (half the bytes, nothing lost), else fp32."""
    values = values.detach().to("cpu", torch.float32).contiguous()
    if compact:
        half = values.half()  # beyond fp16's range -> inf, NaN -> NaN: neither compares equal
        if torch.equal(half.float(), values):
            return half.numpy().astype("<f2", copy=False).tobytes()
    return values.numpy().astype("<f4", copy=False).tobytes()


def stored_row(raw: bytes, floats: int, compact: bool) -> bytes:
    """A checksummed summary row (from another store or the remote tier) as a store with or
    without ``compact`` summaries keeps it: an fp16 row becomes fp32 in a store of format < 4."""
    values = None if compact else summary_values(raw, floats)
    if values is None or values.dtype == np.dtype("<f4"):
        return raw
    payload = values.astype("<f4").tobytes()
    return checksum(payload) + payload


def encode_summaries(layout: BlockLayout, keys: Sequence[BlockKey], summaries: torch.Tensor | None,
                     relative: bool = False, *, compact: bool = False) -> list[tuple[bytes, bytes, bytes]]:  # fmt: skip
    """``(block key, summary row key, checksummed value)`` per key; ``summaries``
    ``[len(keys), 2, kv_heads, head_dim]`` (any float dtype, any device); ``compact``: each row
    in fp16 where that is exact (the store's ``compact_summaries``), else fp32."""
    if not keys:
        return []
    shape = (len(keys), 2, layout.kv_heads, layout.head_dim)
    if summaries is None or tuple(summaries.shape) != shape:
        raise ValueError(f"summaries must be {list(shape)} fp32, got {None if summaries is None else tuple(summaries.shape)}")
    rows = summaries.detach().to("cpu", torch.float32).contiguous().reshape(len(keys), -1)
    half = rows.half()  # beyond fp16's range -> inf, NaN -> NaN: neither compares equal
    exact = (half.float() == rows).all(dim=1).tolist() if compact else [False] * len(keys)
    values = []
    for key, row, row16, small in zip(keys, rows.numpy().astype("<f4", copy=False), half.numpy().astype("<f2", copy=False), exact):
        payload = (row16 if small else row).tobytes()
        values.append((bytes(key), summary_key(bytes(key), relative), checksum(payload) + payload))
    return values


class SummaryRows:
    """The summary rows of one :class:`~hkv.store.block_store.BlockStore`."""

    def __init__(self, store: BlockStore) -> None:
        self.store = store

    def read(self, keys: Sequence[BlockKey], out: torch.Tensor, *, relative: bool = False) -> int:
        """Fill ``out`` ``[n, 2, kv_heads, head_dim]`` fp32 (CPU) with the stored summaries of
        ``keys`` in order (``relative``: those of the relative frame); returns how many leading
        keys had an intact summary (stops at the first missing or corrupt one)."""
        if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or len(out) < len(keys):
            raise ValueError(f"read_summaries: out must be a contiguous CPU fp32 tensor of >= {len(keys)} rows")
        rows = out.view(len(out), -1).numpy()
        with self.store.reading() as txn:
            for i, key in enumerate(keys):
                values = summary_values(txn.get("summaries", summary_key(bytes(key), relative)), rows.shape[1])
                if values is None:
                    return i
                rows[i] = values
        return len(keys)

    def present(self, keys: Sequence[BlockKey], *, relative: bool = False) -> int:
        """How many leading ``keys`` are stored with their summary (blocks + summaries rows;
        ``relative``: the relative frame's)."""
        with self.store.reading() as txn:  # buffers: no copies, but 5x slower small gets
            for i, key in enumerate(keys):
                raw = bytes(key)
                if txn.record_nbytes(raw) is None or txn.get("summaries", summary_key(raw, relative)) is None:
                    return i
        return len(keys)

    def held(self, keys: Sequence[BlockKey], *, relative: bool = False) -> list[bool]:
        """Per key, whether the store has its summary row (``relative``: the relative frame's);
        the row's checksum is checked when it is read."""
        with self.store.reading() as txn:
            return [txn.get("summaries", summary_key(bytes(key), relative)) is not None for key in keys]

    def submit_put(self, keys: Sequence[BlockKey], summaries: torch.Tensor, *, relative: bool = False) -> Future[list[int]]:
        """Store summaries (``relative``: of the relative frame) of the ``keys`` that are stored,
        asynchronously through the writer (write-through of sealed blocks, submitted after the
        blocks); a later commit or flush makes them durable. Returns the writer's future, whose
        result lists the positions in ``keys`` of the blocks that were not stored (their
        summaries were not written)."""
        values = encode_summaries(self.store.layout, keys, summaries, relative, compact=self.store.compact_summaries)

        def job(txn: StoreTxn) -> list[int]:
            skipped = []
            for i, (key, where, value) in enumerate(values):
                if txn.record_nbytes(key) is not None:
                    txn.put("summaries", where, value)
                else:
                    skipped.append(i)
            return skipped

        return self.store.submit_apply(job)
