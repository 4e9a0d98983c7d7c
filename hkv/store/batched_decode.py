"""Lossy block records read one by one, decoded together: one :func:`hkv.encoding.decode` call
per encoding for a whole batch of reads instead of one per record (a decode is a dozen small
tensor ops, whose fixed cost dominates for one 52 KiB block on a CPU)."""

from __future__ import annotations

import numpy as np
import torch

from ..blocks import read_into
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
