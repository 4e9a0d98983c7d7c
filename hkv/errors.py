"""The errors the tiers and the store raise (a leaf: both import it, neither imports the other's).

``TierError`` is the base of every failure to place, move, store or read a block; the store's
errors (``StoreError``) and the session errors (:mod:`hkv.sessions.records`) derive from it, so
a caller catching ``TierError`` sees all of them.
"""

from __future__ import annotations


class TierError(RuntimeError):
    """Base class of tier and store failures."""


class TierFullError(TierError):
    """A put that does not fit the tier's byte budget. Nothing stored was changed."""


class BlockNotFoundError(KeyError, TierError):
    """A block the tier does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "block not found"


class StoreError(TierError):
    """A folder that cannot be opened as this hkv store (not a store, newer format, other layout)."""


class StoreDamagedError(StoreError):
    """The store's files are damaged below the record level (a truncated file, a bad LMDB page);
    the message names the store and what was being read."""


class DiskFullError(StoreError):
    """The filesystem holding the store is full: the write that did not fit changed nothing; the
    message names the store's path, the bytes free and what frees space."""


class RemoteBlockLostError(TierError):
    """A block a lazily pulled session referenced on the remote tier could not be brought into
    the local store when it was read (gone from the server since the session opened, failing its
    checks, or the server down). Nothing wrong was read: the session that drives the turn
    catches it, pulls the session whole and recomputes what is missing (docs/remote.md);
    elsewhere it is an error naming the blocks. ``keys``: their digests."""

    def __init__(self, message: str, keys: list[bytes]) -> None:
        super().__init__(message)
        self.keys = keys
