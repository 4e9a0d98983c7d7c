"""Per-layer block tables on the device: block index -> device slot, for layers whose every
sealed block is on the device (without a GPU: in RAM, on the device or the host tier, whose
pools are then rows of one tensor, :class:`~hkv.tiers.pool.SharedRows`).

A decode step over such a layer can select its blocks (scores over the summaries, top-k), look
up their rows and read them from the pool as a few device operations, with no host list of
the chosen blocks and no device -> host transfer in the layer's attention
(:meth:`~hkv.attention.sequence.SequenceKV.attend`). A table is a copy of the manager's slot maps
taken at one :attr:`~hkv.tiers.placement.Placement.table_epoch`; it stays true while no block
has left its slot since (:meth:`~hkv.tiers.promotion.Promotion.read_table_rows` checks that
under the manager's lock), and grows by the blocks sealed since, without being rebuilt.

A layer with blocks away (a KV larger than the device tier; without a GPU, blocks on disk
alone) is read through the host-side gather instead. Its table is rebuilt only after the epoch
moved, no sooner than ``backoff`` steps after the last failed try (doubling to ``MAX_BACKOFF``),
and each try looks first at the block found away last time, so that a layer that keeps missing
blocks costs one dict lookup per try, not a walk over its blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..blocks import BlockKey
from ..positions import RotaryShift
from ..tiers.manager import TierManager

MAX_BACKOFF = 64  # steps between tries to rebuild a table whose layer keeps missing blocks


@dataclass(slots=True)
class LayerTable:
    """One layer's table: ``slots[:count]`` (long, on the device) are the rows of its blocks
    ``0 .. count - 1`` in the manager's :meth:`~hkv.tiers.promotion.Promotion.table_source`
    (device slots on a GPU), true at manager epoch ``epoch`` (-1: none)."""

    slots: torch.Tensor
    epoch: int = -1
    count: int = 0
    missing: int = -1  # a block found away at the last failed try
    retry_step: int = 0  # the step from which a rebuild may be tried again
    backoff: int = 1


class BlockTables:
    """The device-side block tables of one sequence's layers (see the module docstring)."""

    def __init__(self, manager: TierManager, num_layers: int, device: torch.device) -> None:
        self.manager, self.device = manager, device
        self._tables = [LayerTable(torch.empty(0, dtype=torch.long, device=device)) for _ in range(num_layers)]
        self._positions = torch.arange(0, dtype=torch.long, device=device)

    def current(self, layer: int, count: int) -> bool:
        """Whether ``layer``'s table covers its first ``count`` blocks at the manager's epoch now
        (no lookup, no lock: a cheap test; reads still check the epoch under the lock)."""
        table = self._tables[layer]
        return table.count == count and table.epoch == self.manager.table_epoch

    def lookup(self, layer: int, keys: Sequence[BlockKey], count: int, step: int) -> tuple[int, torch.Tensor] | None:
        """``(epoch, slots)``: the rows ``[count]`` of ``keys[:count]`` (the layer's blocks, oldest
        first) when all are where tables read (:meth:`~hkv.tiers.promotion.Promotion.table_rows`),
        else None. ``step``: the sequence's step counter, for the backoff after a failed rebuild."""
        table = self._tables[layer]
        epoch = self.manager.table_epoch
        if table.epoch == epoch and table.count == count:
            return epoch, table.slots[:count]
        if table.epoch == epoch and table.count < count:  # blocks sealed since: add theirs
            found = self.manager.table_rows(keys[table.count : count])
            if isinstance(found, tuple) and found[0] == epoch:
                self._write(table, table.count, found[1])
                table.count = count
                return epoch, table.slots[:count]
        if step < table.retry_step:
            return None
        found = self.manager.table_rows(keys[:count], table.missing)
        if isinstance(found, int):
            table.epoch, table.count, table.missing = -1, 0, found
            table.retry_step = step + table.backoff
            table.backoff = min(MAX_BACKOFF, 2 * table.backoff)
            return None
        table.epoch, table.count, table.missing, table.backoff = found[0], 0, -1, 1
        self._write(table, 0, found[1])
        table.count = count
        return table.epoch, table.slots[:count]

    def positions(self, n: int) -> torch.Tensor:
        """``arange(n)`` on the device (a view of one cached tensor)."""
        if self._positions.numel() < n:
            self._positions = torch.arange(max(n, 2 * self._positions.numel()), dtype=torch.long, device=self.device)
        return self._positions[:n]

    def forget(self) -> None:
        """Drop every table (the sequence is closed)."""
        for table in self._tables:
            table.slots, table.epoch, table.count = table.slots[:0], -1, 0

    def _write(self, table: LayerTable, start: int, slots: list[int]) -> None:
        """``table.slots[start : start + len(slots)] = slots``, growing it (doubling). The host
        list reaches the device through pinned memory without a blocking copy on CUDA."""
        end = start + len(slots)
        if table.slots.numel() < end:
            grown = torch.empty(max(end, 2 * table.slots.numel(), 64), dtype=torch.long, device=self.device)
            grown[:start] = table.slots[:start]
            table.slots = grown
        values = torch.tensor(slots, dtype=torch.long)
        if self.device.type == "cuda":
            values = values.pin_memory()
        table.slots[start:end].copy_(values, non_blocking=True)


class BlockRotations:
    """cos and sin ``[capacity, R]`` on the device of the moves by whole blocks that
    ``attention.positions = "remap"`` makes (:meth:`~hkv.positions.RotaryShift.block_cos_sin`),
    so that a device-side selection picks its blocks' rows by index, bitwise the rows the host
    path computes from its list of deltas. Grown by doubling as the context grows."""

    def __init__(self, rotary: RotaryShift, block_tokens: int, device: torch.device) -> None:
        self.rotary, self.block_tokens, self.device = rotary, block_tokens, device
        self.cos = self.sin = torch.empty(0, rotary.rotary_dims, device=device)

    def rows(self, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the moves by ``0 .. blocks - 1`` blocks (views of at least that many rows)."""
        if self.cos.shape[0] < blocks:
            capacity = max(blocks, 2 * self.cos.shape[0], 64)
            self.cos, self.sin = self.rotary.block_cos_sin(capacity, self.block_tokens, self.device)
        return self.cos, self.sin
