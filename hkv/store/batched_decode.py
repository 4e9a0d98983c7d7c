"""Lossy block records read one by one, decoded together: one :func:`hkv.encoding.decode` call
per encoding for a whole batch of reads instead of one per record (a decode is a dozen small
tensor ops, whose fixed cost dominates for one 52 KiB block on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..blocks import HEADER_SIZE, BlockLayout, read_into, record_prefix
from ..encoding import EncodedShape, decode


class BatchedDecode:
    """Reads records into rows of ``out`` ``[n, *shape]`` (CPU, ``shape`` a block's ``[2, H, T,
    D]``): raw ones at once, lossy ones staged (their payloads in one ``[n, payload bytes]``
    uint8 tensor per encoding, which a segment read fills straight from the file) and decoded
    when :meth:`finish` runs, one batch per encoding. ``capacity``: how many rows may be staged
    (the batch's blocks, where ``out`` has more rows than that, e.g. a host pool; default all)."""

    def __init__(self, out: torch.Tensor, capacity: int | None = None) -> None:
        self.out = out
        self.capacity = len(out) if capacity is None else capacity
        self._staged: dict[str, torch.Tensor] = {}  # encoding -> [n, payload bytes] uint8
        self._rows: dict[str, list[int]] = {}  # encoding -> the rows of out its staged payloads go to

    def stage(self, encoding: str) -> torch.Tensor:
        """The next free staging row for a payload in ``encoding`` (``[payload bytes]`` uint8):
        fill it, then :meth:`commit` it; until then the next call returns the same row."""
        staged = self._staged.get(encoding)
        if staged is None:
            _, heads, tokens, dim = self.out.shape[1:]
            staged = torch.empty((self.capacity, EncodedShape(encoding, heads, tokens, dim).nbytes), dtype=torch.uint8)
            self._staged[encoding], self._rows[encoding] = staged, []
        return staged[len(self._rows[encoding])]

    def commit(self, encoding: str, row: int) -> None:
        """The staging row :meth:`stage` gave holds the payload of ``out[row]``."""
        self._rows[encoding].append(row)

    def read(self, record: memoryview | bytes, row: int, key: object, *, where: str) -> None:
        """Check ``record`` (RecordError / CorruptRecordError naming ``where``) and fill row ``row``,
        or stage its payload for :meth:`finish`."""
        deferred = read_into(record, self.out[row], key, where=where)  # type: ignore[arg-type]
        if deferred is not None:
            encoding, payload = deferred
            np.copyto(self.stage(encoding).numpy(), np.frombuffer(payload, dtype=np.uint8))
            self.commit(encoding, row)

    def finish(self) -> None:
        """Decode every staged payload into its row."""
        for encoding, rows in self._rows.items():
            if not rows:
                continue
            codes = self._staged[encoding][: len(rows)]
            if rows == list(range(len(self.out))):
                decode(codes, encoding, self.out)  # every row, in order: straight into out
                continue
            blocks = torch.empty((len(rows), *self.out.shape[1:]), dtype=self.out.dtype)
            decode(codes, encoding, blocks)
            self.out.index_copy_(0, torch.tensor(rows), blocks)
        self._staged.clear()
        self._rows.clear()


@dataclass
class RowTargets:
    """Where a batch read puts a record without reading it twice: a record stored as ``out``
    holds blocks (a raw block of ``out``'s dtype and shape, or a block of the store's layout in
    ``out``'s lossy ``encoding``) lands in its row of ``out``; with ``batch`` (raw rows), one in
    the store's own lossy encoding lands in the batch's staging row, decoded with the others at
    the end. What lands is checked by :func:`hkv.blocks.record_matches` against the prefix given
    with the destination; anything else is read whole and checked by the caller's slow path."""

    out: torch.Tensor
    row_nbytes: int
    prefix: bytes  # what a record landing in a row of out starts with
    flat: memoryview | None  # one view of the whole destination, sliced per row (a tensor view per record cost ~10 µs)
    batch: BatchedDecode | None
    staged_encoding: str | None  # the store's lossy encoding, when its records are staged
    staged_nbytes: int
    staged_prefix: bytes

    @classmethod
    def for_read(cls, out: torch.Tensor, layout: BlockLayout, encoding: str, store_encoding: str,
                 batch: BatchedDecode | None) -> RowTargets:  # fmt: skip
        """``out``: the read's destination (raw blocks for ``encoding == "none"``, else payloads
        in that encoding); ``store_encoding``: the store's own encoding."""
        row_nbytes = out[0].numel() * out.element_size() if len(out) else 0
        prefix = (record_prefix(tuple(out.shape[1:]), out.dtype, "none", row_nbytes) if encoding == "none"
                  else record_prefix(layout.shape, layout.dtype, encoding, row_nbytes))  # fmt: skip
        staged = (batch is not None and store_encoding != "none"
                  and out.dtype == layout.dtype and tuple(out.shape[1:]) == layout.shape)  # fmt: skip
        staged_nbytes = layout.encoded_record_nbytes(store_encoding) - HEADER_SIZE if staged else -1
        return cls(
            out=out,
            row_nbytes=row_nbytes,
            prefix=prefix,
            flat=memoryview(out.view(-1).view(torch.uint8).numpy()) if out.is_contiguous() else None,
            batch=batch if staged else None,
            staged_encoding=store_encoding if staged else None,
            staged_nbytes=staged_nbytes,
            staged_prefix=record_prefix(layout.shape, layout.dtype, store_encoding, staged_nbytes) if staged else b"",
        )

    def _row(self, row: int) -> memoryview:
        if self.flat is not None:
            return self.flat[row * self.row_nbytes : (row + 1) * self.row_nbytes]
        return memoryview(self.out[row].view(-1).view(torch.uint8).numpy())

    def target(self, record_nbytes: int, row: int) -> tuple[memoryview, bytes] | None:
        """The payload's destination and the expected header prefix for a record of
        ``record_nbytes`` going to row ``row``; None where it is not a fast case."""
        if record_nbytes == HEADER_SIZE + self.row_nbytes:
            return self._row(row), self.prefix
        if self.batch is not None and record_nbytes == HEADER_SIZE + self.staged_nbytes:
            return memoryview(self.batch.stage(self.staged_encoding).numpy()), self.staged_prefix  # type: ignore[arg-type]
        return None

    def straight_into(self, record_nbytes: int, row: int) -> memoryview | None:
        """Row ``row`` of a contiguous ``out`` where a record of ``record_nbytes`` is a raw block
        of it (its payload may be read straight there, checked against :attr:`prefix`), else None."""
        if record_nbytes != HEADER_SIZE + self.row_nbytes or self.flat is None:
            return None
        return self._row(row)

    def landed(self, record_nbytes: int, row: int) -> None:
        """The payload :meth:`target` gave passed its checks."""
        if self.batch is not None and record_nbytes != HEADER_SIZE + self.row_nbytes:  # the staged case
            self.batch.commit(self.staged_encoding, row)  # type: ignore[arg-type]
