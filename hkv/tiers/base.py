"""The interface every tier implements.

Small and byte-budgeted on purpose: put / get_into / contains / delete, batched variants with
looping defaults, so a network store (Redis, Valkey) can implement it without touching the
manager. A tier holds whole blocks of one :class:`~hkv.blocks.BlockLayout`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch

from ..blocks import BlockKey, BlockLayout
from ..errors import BlockNotFoundError, TierError, TierFullError

__all__ = ["BlockNotFoundError", "Tier", "TierError", "TierFullError"]


class Tier(ABC):
    """One level of the hierarchy. ``capacity_bytes`` is a hard bound on ``used_bytes()``."""

    name: str
    layout: BlockLayout
    capacity_bytes: int

    @property
    def capacity_blocks(self) -> int:
        return self.capacity_bytes // self.layout.nbytes

    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes of block data held now (payload bytes; disk counts its records' bytes)."""

    @abstractmethod
    def contains(self, key: BlockKey) -> bool: ...

    @abstractmethod
    def keys(self) -> Iterator[BlockKey]: ...

    @abstractmethod
    def put(self, key: BlockKey, block: torch.Tensor) -> None:
        """Store a copy of ``block`` (``layout.shape``, ``layout.dtype``). Raises TierFullError."""

    @abstractmethod
    def get_into(self, key: BlockKey, out: torch.Tensor) -> None:
        """Copy the block into ``out``. Raises BlockNotFoundError."""

    @abstractmethod
    def delete(self, key: BlockKey) -> bool:
        """Drop the block; False if it was not here."""

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, BlockKey) and self.contains(key)

    def put_many(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> None:
        """``blocks``: ``[n, *layout.shape]``."""
        for key, block in zip(keys, blocks, strict=True):
            self.put(key, block)

    def get_many_into(self, keys: Sequence[BlockKey], out: torch.Tensor) -> None:
        """``out``: ``[n, *layout.shape]``."""
        for key, block in zip(keys, out, strict=True):
            self.get_into(key, block)

    def close(self) -> None:
        """Release resources; idempotent."""

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
