"""The disk tier: the LMDB block store (:mod:`hkv.store.block_store`) seen as a tier.

Everything a disk tier does (records, budget, writer thread, reads straight into the caller's
tensor) is the store's; this class only gives it the :class:`~hkv.tiers.base.Tier` interface the
manager programs against, so another block store (a remote one) can take its place.
"""

from __future__ import annotations

from ..store.block_store import BlockStore
from .base import Tier


class DiskTier(BlockStore, Tier):
    """Blocks of one layout in the LMDB store at ``path``, within ``capacity_bytes`` of records."""

    name = "disk"
