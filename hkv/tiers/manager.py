"""The tier manager: the only object that moves blocks between tiers.

(STUB: signatures fixed, being implemented. Callers -- the prefetcher, attention and the
transformers integration -- rely on exactly this API.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..blocks import BlockKey, BlockLayout
from ..config import Config

TIER_NAMES = ("device", "host", "disk")


@dataclass(slots=True)
class TierUsage:
    """Occupancy of one tier."""

    used_bytes: int
    capacity_bytes: int
    blocks: int


@dataclass(slots=True)
class ManagerStats:
    """Snapshot returned by :meth:`TierManager.stats`. Byte counts are payload bytes."""

    tiers: dict[str, TierUsage]
    moved_bytes: dict[str, int] = field(default_factory=dict)  # "host->device", "device->host", "disk->host", "host->disk"
    evictions: dict[str, int] = field(default_factory=dict)  # per tier name
    blocks: int = 0  # distinct blocks known to the manager


@dataclass(slots=True)
class GatherReport:
    """What one or more :meth:`TierManager.gather` calls found (block counts, seconds)."""

    resident: int = 0  # already on the device
    waited: int = 0  # in flight (being promoted by another thread), waited for
    fetched: int = 0  # not on the device, fetched on demand
    stall_s: float = 0.0  # time spent waiting for or fetching blocks


class TierManager:
    """Places blocks of one layout across device, host and disk within the config's budgets.

    Invariants: a tier never exceeds its budget; a block put is in at least one tier until it
    is deleted (or the disk policy evicts it while unreferenced); a block read back is bitwise
    the block put. Thread-safe.
    """

    def __init__(self, config: Config, layout: BlockLayout, *, device: torch.device | str | None = None) -> None:
        raise NotImplementedError

    device: torch.device  # torch device of the device tier

    def put(self, key: BlockKey, block: torch.Tensor, *, pin: bool = False) -> None:
        """Insert a sealed block (copied). Goes to the device tier (evicting unpinned blocks
        down the tiers if needed); ``pin`` keeps it on the device until :meth:`unpin`.
        With ``store.persist`` it is also written through to disk. Re-putting a known key is a
        no-op apart from pinning and recency."""
        raise NotImplementedError

    def put_many(self, keys: Sequence[BlockKey], blocks: torch.Tensor, *, pin: bool = False) -> None:
        """``blocks``: ``[n, 2, kv_heads, block_tokens, head_dim]``."""
        raise NotImplementedError

    def contains(self, key: BlockKey) -> bool:
        raise NotImplementedError

    def where(self, key: BlockKey) -> frozenset[str]:
        """Names of the tiers holding the block (empty if unknown)."""
        raise NotImplementedError

    def gather(self, keys: Sequence[BlockKey], *, report: GatherReport | None = None) -> torch.Tensor:
        """The blocks as one new tensor ``[n, 2, kv_heads, block_tokens, head_dim]`` on the device.

        Blocks not on the device are promoted on demand (disk -> host -> device); blocks that a
        concurrent :meth:`promote` (the prefetcher's threads) is moving are waited for, not
        read twice. Raises ValueError if ``n`` exceeds :meth:`gather_capacity`. If ``report``
        is given, its counters are increased.
        """
        raise NotImplementedError

    def gather_capacity(self) -> int:
        """Most blocks one :meth:`gather` can take (device slots not pinned)."""
        raise NotImplementedError

    def read(self, key: BlockKey) -> torch.Tensor:
        """A CPU copy of the block, from whichever tier holds it (no promotion)."""
        raise NotImplementedError

    def promote(self, keys: Sequence[BlockKey], to: str = "device") -> None:
        """Bring blocks up to ``to`` ("host" or "device"); blocks already there are skipped.

        Called from the prefetcher's worker threads: the disk read and the copy run without
        holding the manager's lock, blocks being moved are marked in flight so :meth:`gather`
        waits for them. On CUDA the host -> device copy runs on the manager's copy stream and
        :meth:`gather` orders on its event. If the device has no unpinned room the block stops
        at host (prefetch is best effort; never raises for lack of room)."""
        raise NotImplementedError

    def demote(self, keys: Sequence[BlockKey], to: str = "host") -> None:
        """Move blocks down to ``to`` ("host" or "disk"), dropping the copies above it."""
        raise NotImplementedError

    def pin(self, keys: Sequence[BlockKey]) -> None:
        raise NotImplementedError

    def unpin(self, keys: Sequence[BlockKey]) -> None:
        raise NotImplementedError

    def note_scores(self, keys: Sequence[BlockKey], scores: torch.Tensor) -> None:
        """Recent attention scores of blocks, for the score-aware eviction policy."""
        raise NotImplementedError

    def delete(self, keys: Sequence[BlockKey]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until every write-through to disk is committed."""
        raise NotImplementedError

    def stats(self) -> ManagerStats:
        raise NotImplementedError

    def close(self) -> None:
        """Flush, stop background threads, close the store. Idempotent."""
        raise NotImplementedError

    def __enter__(self) -> TierManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
