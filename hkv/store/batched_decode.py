"""Lossy block records read one by one, decoded together: one :func:`hkv.encoding.decode` call
per encoding for a whole batch of reads instead of one per record (a decode is a dozen small
tensor ops, whose fixed cost dominates for one 52 KiB block on a CPU)."""

from __future__ import annotations

import torch

from ..blocks import read_into
from ..encoding import decode


class BatchedDecode:
    """Reads records into rows of ``out`` ``[n, *shape]`` (CPU): raw ones at once, lossy ones
    when :meth:`finish` decodes them, one batch per encoding."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out
        self._pending: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def read(self, record: memoryview | bytes, row: int, key: object, *, where: str) -> None:
        """Check ``record`` (RecordError / CorruptRecordError naming ``where``) and fill row ``row``,
        or queue its codes for :meth:`finish`."""
        deferred = read_into(record, self.out[row], key, where=where)  # type: ignore[arg-type]
        if deferred is not None:
            self._pending.setdefault(deferred[0], []).append((row, deferred[1]))

    def finish(self) -> None:
        """Decode every queued record into its row."""
        for encoding, rows in self._pending.items():
            codes = torch.stack([codes for _, codes in rows])
            blocks = torch.empty((len(rows), *self.out.shape[1:]), dtype=self.out.dtype)
            decode(codes, encoding, blocks)
            self.out.index_copy_(0, torch.tensor([row for row, _ in rows]), blocks)
        self._pending.clear()
