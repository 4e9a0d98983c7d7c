"""Blocks the tier manager knows but the local store does not hold yet: a lazily pulled
session's blocks, still on the remote tier (docs/remote.md, "Lazy pull").

The manager registers them as on disk (:meth:`~hkv.tiers.manager.TierManager.learn_remote`) and,
before any read that would go to the disk (a gather, a pin, the prefetcher's promotion), asks
:meth:`RemoteBlocks.ensure` to bring the ones still remote into the local store: one batched
call per source (the session's pull: ``MGET``, every record checked, written with its summary).
Blocks another thread is bringing are waited for, not fetched twice. A block that cannot be
brought is *lost*: a strict read raises :class:`~hkv.errors.RemoteBlockLostError` (nothing is
read), a best-effort one (the prefetcher) skips it. This module knows nothing of Redis or
sessions: a source is anything with ``fetch(keys) -> keys now in the local store``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from ..errors import RemoteBlockLostError

Digest = bytes


class RemoteSource(Protocol):
    """Where some remote blocks come from (:class:`hkv.sessions.lazy_pull.LazyPull` is one)."""

    name: str  # said in errors (a session's name)

    def fetch(self, keys: list[Digest]) -> set[Digest]:
        """Bring ``keys`` into the local store (checked); those now there."""
        ...


class RemoteBlocks:
    """The manager's registry of remote-backed blocks (thread-safe)."""

    def __init__(self) -> None:
        self._source: dict[Digest, RemoteSource] = {}  # still remote
        self._lost: dict[Digest, RemoteSource] = {}  # could not be brought
        self._inflight: set[Digest] = set()
        self._cond = threading.Condition()

    def add(self, keys: Sequence[Digest], source: RemoteSource) -> None:
        with self._cond:
            for key in keys:
                self._source[key] = source
                self._lost.pop(key, None)

    def __bool__(self) -> bool:
        return bool(self._source) or bool(self._lost)  # read without the lock: a hint for the hot path

    def pending(self, source: RemoteSource) -> list[Digest]:
        """``source``'s blocks still remote (not lost)."""
        with self._cond:
            return [key for key, owner in self._source.items() if owner is source]

    def remove(self, source: RemoteSource) -> list[Digest]:
        """Forget ``source`` (its session closed or pulled whole) once its fetches in flight are
        done; its blocks that never reached the local store (remote or lost)."""
        with self._cond:
            self._cond.wait_for(lambda: not any(self._source.get(key) is source for key in self._inflight))
            gone = [key for key, owner in self._source.items() if owner is source]
            gone += [key for key, owner in self._lost.items() if owner is source]
            for key in gone:
                self._source.pop(key, None)
                self._lost.pop(key, None)
            return gone

    def ensure(self, keys: Sequence[Digest], *, strict: bool) -> list[Digest]:
        """Bring the remote ones of ``keys`` into the local store (see the module docstring);
        ``keys`` without the lost ones. ``strict``: RemoteBlockLostError if any is lost."""
        if not self:
            return list(keys)
        with self._cond:
            mine = [key for key in dict.fromkeys(keys) if key in self._source and key not in self._inflight]
            self._inflight.update(mine)
        try:
            by_source: dict[int, tuple[RemoteSource, list[Digest]]] = {}
            for key in mine:
                source = self._source[key]
                by_source.setdefault(id(source), (source, []))[1].append(key)
            for source, wanted in by_source.values():
                got: set[Digest] = set()
                try:
                    got = source.fetch(wanted)
                finally:
                    with self._cond:
                        for key in wanted:
                            del self._source[key]
                            if key not in got:
                                self._lost[key] = source
        finally:
            with self._cond:
                self._inflight.difference_update(mine)
                self._cond.notify_all()
        with self._cond:  # those another thread is bringing
            self._cond.wait_for(lambda: not any(key in self._inflight for key in keys))
            lost = [key for key in dict.fromkeys(keys) if key in self._lost]
            if lost and strict:
                names = sorted({self._lost[key].name for key in lost})
                raise RemoteBlockLostError(
                    f"session {', '.join(map(repr, names))}: {len(lost)} blocks it referenced on the remote tier could not be "
                    f"read from it (gone since the session opened, damaged, or the server down; first: {lost[0].hex()})",
                    lost,
                )
        if not lost:
            return list(keys)
        lost_set = set(lost)
        return [key for key in keys if key not in lost_set]
