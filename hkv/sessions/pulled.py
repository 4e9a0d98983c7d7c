"""The part of a :class:`~hkv.sessions.session.Session` that resumes it from the remote tier
(``[remote]``, docs/remote.md): the open's choice of record, pulled lazily (:mod:`.lazy_pull`) or
whole (:func:`.remote.pull_session`), the lazy pull settled before a commit or at close, and the
recovery from a block of the lazy pull lost on the server: the session pulls itself whole and runs
its call again, so no call ever reads wrong KV or fails for it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ..errors import RemoteBlockLostError, TierError
from .lazy_pull import LazyPull, open_lazy
from .records import SessionRecord

log = logging.getLogger(__name__)


class PulledSession:
    """Mixed into :class:`~hkv.sessions.session.Session`, whose state it reads and sets."""

    _lazy: LazyPull | None  # a lazy pull not yet settled (its blocks partly on the remote tier)

    @property
    def pulled_blocks(self) -> tuple[int, int] | None:
        """While a lazy pull from the remote tier is not settled: ``(blocks fetched so far, blocks
        the local store lacked at open)``, every layer counted; None otherwise."""
        lazy = self._lazy
        return None if lazy is None else (lazy.fetched_blocks, len(lazy.remote_keys))

    def _remote_record(self, record: SessionRecord | None) -> SessionRecord | None:
        """The record to open: the local one, or the server's newer copy, pulled lazily
        (``remote.pull = "lazy"``: :mod:`.lazy_pull`) or whole (copied into the local store now)."""
        if self.runtime.config.remote.pull == "lazy":
            lazy = open_lazy(self._store, self._remote.remote, self.name, record, relative=self._cache.sequence.summaries.relative)
            if isinstance(lazy, LazyPull):
                self._lazy = lazy
                return lazy.record
            if lazy is None:
                return record  # the server has no newer copy (or is down)
        if self._remote.pull(self.name, record):
            return self._store.get(self.name)
        return record

    def _recover(self, error: RemoteBlockLostError, started: float) -> None:
        """A block of the lazy pull could not be read (gone from the server since the open,
        damaged, the server down): nothing was read from it. Pull the session whole (its local
        record cut at the first block missing on the server, as a whole open does) and restore the
        cache from it; the caller runs its call again, whose fill recomputes the missing blocks.
        With the server down as well, the session's tokens are known: it restores with no KV and
        the fill adopts what the local store holds and computes the rest."""
        lazy = self._lazy
        log.warning("remote tier: %s; session %r is pulled whole and what is missing is recomputed", error, self.name)
        self._cache.close()
        self._cache = self.runtime.new_cache(persist=True)  # before anything that may fail: a session always has one
        self._drop_lazy()
        if self._remote.pull(self.name, self._store.get(self.name)):
            record = self._store.get(self.name)
        else:
            record = dataclasses.replace(lazy.record, kv_tokens=0, kv_blocks=0, tail_tokens=0)
        self._record = record
        self.restored = self._restore(record, started)

    def _drop_lazy(self) -> None:
        """Stop the lazy pull and forget its blocks that never reached the local store (the
        cache no longer references them: closed, or every block is local)."""
        lazy, self._lazy = self._lazy, None
        if lazy is not None:
            lazy.stop()
            self.runtime.manager.forget_remote(lazy)

    def _call(self, call: Any) -> Any:
        """``call()``; if a block of the lazy pull is lost meanwhile (nothing was read from it),
        the session is pulled whole (:meth:`_recover`) and ``call()`` runs again, once."""
        try:
            return call()
        except RemoteBlockLostError as error:
            if self._lazy is None:
                raise
            self._recover(error, time.perf_counter())
            return call()

    def _settle_lazy(self) -> bool:
        """Before a commit: bring the lazy pull's remaining blocks into the local store. With
        nothing new since the open, commit the pulled record (True: the commit is done). A block
        lost now: the session is pulled whole and the KV of the tokens since refilled."""
        tokens, lazy = self._tokens, self._lazy
        try:
            lazy.finish()
        except RemoteBlockLostError as error:
            self._recover(error, time.perf_counter())
            if len(tokens) > len(self._tokens):
                self.runtime.fill(self._cache, tokens[self.kv_tokens : -1], progress=False)
                self._tokens = tokens
            return False
        done = (len(self._tokens), self._cache.sequence.sealed_blocks(), self.kv_tokens) == self._committed
        if done:
            self.runtime.manager.apply_store_changes(lazy.commit_record())
        self._drop_lazy()
        return done

    def _close_lazy(self) -> None:
        """Closing without a commit: the pulled record is committed to the local store once
        its blocks are all there, as a whole pull does at open. A block lost now leaves it on the
        server only (the next open pulls it again)."""
        try:
            self._lazy.finish()
            self.runtime.manager.apply_store_changes(self._lazy.commit_record())
        except TierError as error:
            log.warning("remote tier: session %r stays on the server only (its pull did not finish: %s)", self.name, error)
