"""A preallocated pool of block slots: the storage of the device and host tiers.

The pool is one tensor ``data: [n_slots, 2, kv_heads, block_tokens, head_dim]`` with
``n_slots = capacity_bytes // layout.nbytes`` (so it never exceeds its budget), a key -> slot
map and a free list that hands out the lowest free slot first (blocks put together land in
consecutive slots, so batched moves copy long runs). Gathers are ``index_select`` over slots,
moves between pools are run-coalesced ``copy_`` calls (see :func:`copy_slots`).

An encoded pool (the host tier with ``tiers.host_encoding``, :mod:`hkv.tiers.slot_codec`)
has ``data: [n_slots, payload bytes]`` uint8 and ``n_slots = capacity_bytes // payload bytes``;
:meth:`SlotPool.write_slots` encodes and :meth:`SlotPool.read_slots` decodes, so callers that
use them (never ``data`` directly) see raw blocks either way.

Keys are any hashable block identity: a :class:`~hkv.blocks.BlockKey` when a pool is used as a
:class:`~hkv.tiers.base.Tier`, the key's 16-byte digest inside the tier manager (a bytes
object caches its hash, which makes bulk bookkeeping several times cheaper).

The tensor is allocated on first use, not at construction: a 2 GiB default host budget costs
nothing until blocks arrive. A pool is not thread-safe on its own; the tier manager serialises
every metadata change under its lock.

Without a GPU both the device and the host pool are RAM; when both hold raw blocks they are two
row ranges of one tensor (:class:`SharedRows`), so that one ``index_select`` reads blocks from
either (the block tables of :mod:`hkv.attention.block_table`). Each pool still has its own slots,
budget and free list.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterator, Sequence

import torch

from ..blocks import BlockKey, BlockLayout
from ..memory import page_aligned_empty
from .base import BlockNotFoundError, Tier, TierFullError
from .slot_codec import SlotCodec


class SharedRows:
    """One tensor behind two raw pools on the same device (the device and host pools of a machine
    without a GPU): ``first``'s slots are its rows ``0 .. first.n_slots - 1``, ``second``'s the
    rows after them, so a block's row is its slot, plus ``first.n_slots`` in ``second``.
    Allocated when either pool first uses its data; released when either pool is closed."""

    def __init__(self, first: SlotPool, second: SlotPool) -> None:
        if first.codec.lossy or second.codec.lossy or first.device != second.device or first.allocated or second.allocated:
            raise ValueError("SharedRows: two raw pools on one device, neither allocated yet")
        self.first, self.second = first, second
        self.offset = first.n_slots  # the row of second's slot 0
        self._data: torch.Tensor | None = None
        first._shared, second._shared = (self, 0), (self, self.offset)

    @property
    def data(self) -> torch.Tensor:
        """``[first.n_slots + second.n_slots, 2, kv_heads, block_tokens, head_dim]``."""
        if self._data is None:
            shape = (self.first.n_slots + self.second.n_slots, *self.first.codec.slot_shape)
            with torch.inference_mode(False):  # see SlotPool._allocate
                self._data = page_aligned_empty(shape, self.first.codec.slot_dtype, self.first.device)
        return self._data

    def release(self) -> None:
        self._data = None


class SlotPool(Tier):
    """Blocks of one layout in preallocated slots of one tensor on ``device``, raw or encoded
    (``encoding``: ``"none"``, ``"int8"``, ``"int4"``)."""

    def __init__(
        self, name: str, layout: BlockLayout, capacity_bytes: int, device: torch.device | str, *, pin_memory: bool = False,
        encoding: str = "none",
    ) -> None:  # fmt: skip
        self.codec = SlotCodec(layout, encoding)
        if capacity_bytes < self.codec.slot_nbytes:
            raise ValueError(f"{name} tier: capacity {capacity_bytes} bytes is smaller than one block ({layout.describe()})")
        self.name, self.layout, self.capacity_bytes = name, layout, int(capacity_bytes)
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        self.slot_nbytes = self.codec.slot_nbytes
        self.n_slots = self.capacity_bytes // self.slot_nbytes
        self._data: torch.Tensor | None = None
        self._slot_of: dict[BlockKey, int] = {}
        self._key_of: list[BlockKey | None] = [None] * self.n_slots
        self._free: list[int] = list(range(-self.n_slots + 1, 1))  # negated, sorted: the lowest slot is last
        self._reserved = 0  # slots taken by alloc() and not yet assigned a key
        self._shared: tuple[SharedRows, int] | None = None  # (the tensor shared with another pool, this pool's first row)

    # -- storage --------------------------------------------------------------------------------
    @property
    def data(self) -> torch.Tensor:
        """The pool tensor ``[n_slots, 2, kv_heads, block_tokens, head_dim]``, or ``[n_slots, payload
        bytes]`` uint8 when encoded (allocated on first use)."""
        if self._data is None:
            self._data = self._allocate()
        return self._data

    def _allocate(self) -> torch.Tensor:
        if self._shared is not None:
            shared, start = self._shared
            return shared.data[start : start + self.n_slots]
        shape = (self.n_slots, *self.codec.slot_shape)
        # A normal tensor even when first used inside torch.inference_mode (a model's forward):
        # an inference tensor could not be written by the prefetcher's threads, which run outside it.
        with torch.inference_mode(False):
            return page_aligned_empty(shape, self.codec.slot_dtype, self.device, pin_memory=self.pin_memory)

    @property
    def capacity_blocks(self) -> int:
        return self.n_slots

    @property
    def allocated(self) -> bool:
        return self._data is not None

    # -- slots ----------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """Reserve the lowest free slot (no key yet), or None when the pool is full."""
        if not self._free:
            return None
        self._reserved += 1
        return -self._free.pop()

    def reserved_slots(self) -> int:
        """Slots taken by :meth:`alloc` / :meth:`alloc_many` and not yet assigned a key (moves in flight)."""
        return self._reserved

    def alloc_many(self, n: int) -> list[int]:
        """Reserve the ``min(n, free)`` lowest free slots, ascending."""
        n = min(n, len(self._free))
        if n <= 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        self._reserved += n
        return [-slot for slot in reversed(taken)]

    def assign_many(self, keys: Sequence[BlockKey], slots: Sequence[int]) -> None:
        """:meth:`assign` for many new keys (the caller knows they are new)."""
        self._reserved -= len(slots)
        self._slot_of.update(zip(keys, slots))
        key_of = self._key_of
        for key, slot in zip(keys, slots):
            key_of[slot] = key

    def assign(self, key: BlockKey, slot: int) -> None:
        """Give a slot reserved by :meth:`alloc` to ``key``."""
        if key in self._slot_of:
            raise ValueError(f"{self.name} tier: block {key.hex()} already has slot {self._slot_of[key]}")
        self._reserved -= 1
        self._slot_of[key] = slot
        self._key_of[slot] = key

    def unreserve(self, slot: int) -> None:
        """Return a slot taken by :meth:`alloc` and never assigned."""
        self._reserved -= 1
        insort(self._free, -slot)

    def remove(self, key: BlockKey) -> int:
        """Drop ``key``'s slot back to the free list; returns the slot. Raises BlockNotFoundError."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            raise BlockNotFoundError(f"{self.name} tier: block {key.hex()} not found")
        self._key_of[slot] = None
        insort(self._free, -slot)
        return slot

    def remove_many(self, keys: Sequence[BlockKey]) -> None:
        """:meth:`remove` for many keys held here."""
        slot_of, key_of = self._slot_of, self._key_of
        freed = []
        for key in keys:
            slot = slot_of.pop(key)
            key_of[slot] = None
            freed.append(-slot)
        self._free.extend(freed)
        self._free.sort()

    @property
    def slot_map(self) -> dict[BlockKey, int]:
        """The live key -> slot map (read it, never change it): fast membership tests in bulk."""
        return self._slot_of

    def slot(self, key: BlockKey) -> int | None:
        return self._slot_of.get(key)

    def slots(self, keys: Sequence[BlockKey]) -> list[int]:
        try:
            return [self._slot_of[key] for key in keys]
        except KeyError as error:
            raise BlockNotFoundError(f"{self.name} tier: block {error.args[0].hex()} not found") from None

    @property
    def encoding(self) -> str:
        """How slots hold blocks: ``"none"`` (raw) or a lossy encoding."""
        return self.codec.encoding

    def write_slots(self, slots: Sequence[int], blocks: torch.Tensor, rows: Sequence[int]) -> None:
        """``slot[slots[i]] = blocks[rows[i]]`` (raw blocks ``[n, *layout.shape]``, any device),
        encoded on the blocks' device first when the pool is encoded; complete on return."""
        if not slots:
            return
        if not self.codec.lossy:
            copy_slots(self.data, slots, blocks, rows)
            return
        picked = blocks if list(rows) == list(range(len(blocks))) else blocks[list(rows)]
        encoded = self.codec.encode(picked).to(self.device)
        copy_slots(self.data, slots, encoded, list(range(len(slots))))

    def read_slots(self, slots: Sequence[int]) -> torch.Tensor:
        """The blocks in ``slots`` as a new tensor ``[n, *layout.shape]`` on the pool's device (decoded)."""
        picked = self.data.index_select(0, self.index(slots))
        return self.codec.decode(picked) if self.codec.lossy else picked

    def block(self, key: BlockKey) -> torch.Tensor:
        """A copy of the block, ``[2, kv_heads, block_tokens, head_dim]`` (decoded when encoded)."""
        slot = self.slot(key)
        if slot is None:
            raise BlockNotFoundError(f"{self.name} tier: block {key.hex()} not found")
        return self.read_slots([slot])[0]

    def view(self, key: BlockKey) -> torch.Tensor:
        """The block's slot, ``[2, kv_heads, block_tokens, head_dim]`` (``[payload bytes]`` when
        encoded), without a copy."""
        slot = self.slot(key)
        if slot is None:
            raise BlockNotFoundError(f"{self.name} tier: block {key.hex()} not found")
        return self.data[slot]

    def index(self, slots: Sequence[int]) -> torch.Tensor:
        """Slot indices as a long tensor on the pool's device (for ``index_select`` / ``index_copy_``)."""
        index = torch.as_tensor(slots, dtype=torch.long)
        return index if self.device.type == "cpu" else index.to(self.device, non_blocking=True)

    # -- Tier interface -------------------------------------------------------------------------
    def used_bytes(self) -> int:
        return (len(self._slot_of) + self._reserved) * self.slot_nbytes

    def __len__(self) -> int:
        return len(self._slot_of)

    def contains(self, key: BlockKey) -> bool:
        return key in self._slot_of

    def keys(self) -> Iterator[BlockKey]:
        return iter(list(self._slot_of))

    def _check_blocks(self, blocks: torch.Tensor, n: int) -> None:
        if tuple(blocks.shape) != (n, *self.layout.shape) or blocks.dtype != self.layout.dtype:
            raise ValueError(
                f"{self.name} tier: blocks {tuple(blocks.shape)} {blocks.dtype}; expected "
                f"[{n}, {', '.join(map(str, self.layout.shape))}] {self.layout.dtype}"
            )

    def put(self, key: BlockKey, block: torch.Tensor) -> None:
        self.put_many([key], block.unsqueeze(0))

    def put_many(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> None:
        """Store copies of ``blocks`` ``[n, *layout.shape]``; known keys are overwritten in place.

        Raises TierFullError (nothing stored) when the new keys do not fit.
        """
        self._check_blocks(blocks, len(keys))
        new = [key for key in dict.fromkeys(keys) if key not in self._slot_of]
        if len(new) > len(self._free):
            raise TierFullError(
                f"{self.name} tier: {len(new)} new blocks do not fit: {len(self._free)} of {self.n_slots} slots free "
                f"({self.capacity_bytes} bytes budget)"
            )
        for key in new:
            self.assign(key, self.alloc())  # type: ignore[arg-type]
        self.write_slots(self.slots(keys), blocks, list(range(len(keys))))

    def get_into(self, key: BlockKey, out: torch.Tensor) -> None:
        out.copy_(self.block(key))

    def get_many_into(self, keys: Sequence[BlockKey], out: torch.Tensor) -> None:
        if self.codec.lossy:
            out.copy_(self.read_slots(self.slots(keys)))
            return
        copy_slots(out, list(range(len(keys))), self.data, self.slots(keys))

    def delete(self, key: BlockKey) -> bool:
        if key not in self._slot_of:
            return False
        self.remove(key)
        return True

    def close(self) -> None:
        self._data = None
        if self._shared is not None:
            self._shared[0].release()
        self._slot_of.clear()
        self._key_of = [None] * self.n_slots
        self._free = list(range(-self.n_slots + 1, 1))
        self._reserved = 0


# Slot lists up to this long are coalesced in plain Python: the ten tensor ops of the batched
# path cost more there, and a prefetch worker holds the GIL through them (the model's thread waits)
_RUNS_IN_PYTHON = 256


def runs(dst_slots: Sequence[int], src_slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Coalesce slot pairs into ``(dst_start, src_start, length)`` runs of consecutive slots."""
    if len(dst_slots) != len(src_slots):
        raise ValueError(f"runs: {len(dst_slots)} destination slots but {len(src_slots)} source slots")
    if not dst_slots:
        return []
    if len(dst_slots) <= _RUNS_IN_PYTHON:  # a prefetch job's or a decode step's few slots: no tensor ops
        out: list[tuple[int, int, int]] = []
        d0, s0, n = int(dst_slots[0]), int(src_slots[0]), 1
        for d, s in zip(dst_slots[1:], src_slots[1:]):
            if d == d0 + n and s == s0 + n:
                n += 1
            else:
                out.append((d0, s0, n))
                d0, s0, n = int(d), int(s), 1
        out.append((d0, s0, n))
        return out
    dst = torch.as_tensor(dst_slots, dtype=torch.long)
    src = torch.as_tensor(src_slots, dtype=torch.long)
    breaks = ((dst[1:] != dst[:-1] + 1) | (src[1:] != src[:-1] + 1)).nonzero().flatten() + 1
    starts = [0, *breaks.tolist()]
    ends = [*starts[1:], len(dst_slots)]
    return [(int(dst_slots[a]), int(src_slots[a]), b - a) for a, b in zip(starts, ends)]


def copy_slots(
    dst: torch.Tensor, dst_slots: Sequence[int], src: torch.Tensor, src_slots: Sequence[int], *, non_blocking: bool = False
) -> None:
    """``dst[dst_slots[i]] = src[src_slots[i]]`` for all i, batched.

    Consecutive slots are copied as one run (one ``copy_`` each, a single DMA between host and
    device); when the slots are scattered (more than one run per 4 blocks) the source is
    gathered with one ``index_select`` and scattered with one ``index_copy_``.
    """
    if not dst_slots:
        return
    spans = runs(dst_slots, src_slots)
    if len(spans) * 4 <= len(dst_slots) or len(dst_slots) == 1:
        for d, s, n in spans:
            dst[d : d + n].copy_(src[s : s + n], non_blocking=non_blocking)
        return
    src_index = torch.as_tensor(src_slots, dtype=torch.long, device=src.device)
    picked = src.index_select(0, src_index)
    if picked.device != dst.device:
        if dst.device.type == "cuda" and src.device.type == "cpu":
            picked = picked.pin_memory()
        picked = picked.to(dst.device, non_blocking=non_blocking)
    dst.index_copy_(0, torch.as_tensor(dst_slots, dtype=torch.long, device=dst.device), picked)
