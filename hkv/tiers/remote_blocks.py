"""Blocks the tier manager knows but the local store does not hold yet: a lazily pulled
session's blocks, still on the remote tier (docs/remote.md, "Lazy pull").

The manager registers them as on disk (:meth:`~hkv.tiers.manager.TierManager.learn_remote`) and,
before any read that would go to the disk (a gather, a pin, the prefetcher's promotion), asks
:meth:`RemoteBlocks.ensure` to bring the ones still remote: one batched call per source (the
session's pull: ``MGET``, every record checked). The source submits their write into the local
store (with their summaries) and hands the records over; until that write is durable the disk
reads take them from here (:meth:`RemoteBlocks.records`), so a read never waits for a disk commit.
Blocks another thread is bringing are waited for, not fetched twice. A block that cannot be
brought (or whose write fails) is *lost*: a strict read raises
:class:`~hkv.errors.RemoteBlockLostError` (nothing is read), a best-effort one (the prefetcher)
skips it. This module knows nothing of Redis or sessions: a source is anything with
``fetch(keys) -> (records, write future)``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

from ..errors import RemoteBlockLostError

log = logging.getLogger(__name__)
Digest = bytes


class RemoteSource(Protocol):
    """Where some remote blocks come from (:class:`hkv.sessions.lazy_pull.LazyPull` is one)."""

    name: str  # said in errors (a session's name)

    def fetch(self, keys: list[Digest]) -> tuple[dict[Digest, bytes], Future | None]:
        """Fetch ``keys`` (checked) and submit their write into the local store: ``(records
        fetched, the write's future)``; a key missing from the records could not be fetched."""
        ...


class RemoteBlocks:
    """The manager's registry of remote-backed blocks (thread-safe)."""

    def __init__(self) -> None:
        self._source: dict[Digest, RemoteSource] = {}  # still remote
        self._held: dict[Digest, tuple[bytes, RemoteSource]] = {}  # fetched; their local write not yet durable
        self._lost: dict[Digest, RemoteSource] = {}  # could not be brought
        self._inflight: set[Digest] = set()
        self._cond = threading.Condition()

    def add(self, keys: Sequence[Digest], source: RemoteSource) -> None:
        with self._cond:
            for key in keys:
                self._source[key] = source
                self._lost.pop(key, None)

    def __bool__(self) -> bool:
        return bool(self._source) or bool(self._lost) or bool(self._held)  # read without the lock: a hint for the hot path

    def pending(self, source: RemoteSource) -> list[Digest]:
        """``source``'s blocks still remote (not lost)."""
        with self._cond:
            return [key for key, owner in self._source.items() if owner is source]

    def claim(self, keys: Sequence[Digest]) -> set[Digest]:
        """Stop bringing those of ``keys`` still remote or lost, whose data a sequence has just
        computed (a recompute after a recovery): the manager stores that data instead. Those
        taken (not those being fetched: their records arrive)."""
        if not self._source and not self._lost:
            return set()
        with self._cond:
            taken = {key for key in keys if (key in self._source and key not in self._inflight) or key in self._lost}
            for key in taken:
                self._source.pop(key, None)
                self._lost.pop(key, None)
            return taken

    def records(self, keys: Sequence[Digest]) -> dict[Digest, bytes] | None:
        """The records of ``keys`` fetched and not yet durable in the local store (None: none)."""
        if not self._held:
            return None
        with self._cond:
            return {key: self._held[key][0] for key in keys if key in self._held} or None

    def written(self, source: RemoteSource) -> None:
        """Wait until every block fetched from ``source`` is durable in the local store (or lost)."""
        with self._cond:
            self._cond.wait_for(lambda: not any(owner is source for _, owner in self._held.values()))

    def remove(self, source: RemoteSource) -> list[Digest]:
        """Forget ``source`` (its session closed or pulled whole) once its fetches and writes in
        flight are done; its blocks that never reached the local store (remote or lost)."""
        with self._cond:
            self._cond.wait_for(lambda: not any(self._source.get(key) is source for key in self._inflight)
                                and not any(owner is source for _, owner in self._held.values()))  # fmt: skip
            gone = [key for key, owner in self._source.items() if owner is source]
            gone += [key for key, owner in self._lost.items() if owner is source]
            for key in gone:
                self._source.pop(key, None)
                self._lost.pop(key, None)
            return gone

    def ensure(self, keys: Sequence[Digest], *, strict: bool) -> list[Digest]:
        """Bring the remote ones of ``keys`` (see the module docstring); ``keys`` without the
        lost ones. ``strict``: RemoteBlockLostError if any is lost."""
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
                records: dict[Digest, bytes] = {}
                future: Future | None = None
                try:
                    records, future = source.fetch(wanted)
                finally:
                    with self._cond:
                        for key in wanted:
                            del self._source[key]
                            if key in records:
                                self._held[key] = (records[key], source)
                            else:
                                self._lost[key] = source
                if future is not None:
                    future.add_done_callback(lambda done, fetched=list(records), source=source: self._written(fetched, source, done))
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

    def _written(self, keys: list[Digest], source: RemoteSource, done: Future) -> None:
        """A fetch's write into the local store finished (the writer thread): the records are
        read from there now; a failed write makes them lost."""
        error = done.exception()
        if error is not None:
            log.warning("remote tier: %d blocks of session %r fetched from the remote tier were not stored locally: %s",
                        len(keys), source.name, error)  # fmt: skip
        with self._cond:
            for key in keys:
                self._held.pop(key, None)
                if error is not None:
                    self._lost[key] = source
            self._cond.notify_all()
