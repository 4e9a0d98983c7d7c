"""Persistent conversations: a sequence's KV committed to the LMDB store, resumable in any process.

``with rt.session("name") as s: s.generate(ids, max_new_tokens=...)``. Design and store layout:
docs/sessions-design.md; user guide: docs/sessions.md.

A session owns one long-lived :class:`~hkv.integrations.transformers.HkvCache` whose sealed
blocks are written through to the store (with their summaries). A commit makes the conversation
durable in one store transaction: token ids, the block keys it references (refcounted, so
sessions sharing a prefix store its blocks once), the new blocks' summaries and the unsealed
tail's KV; after it, the new blocks' summaries are also written together as summary runs
(:mod:`.summary_runs`). Opening a session restores it lazily: the blocks are *adopted*
(:func:`hkv.attention.prefix.adopt_stored_prefix`: keys and summaries, the summaries read in one
pass from the runs, no block data read but the pinned sink / local blocks), so resuming costs a
few reads, not a prefill.

A session talks to the model only through its runtime's public seam (:class:`SessionHost`,
which :class:`hkv.integrations.runtime.Runtime` is): this package never imports the
integrations, which import it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..attention.prefix import adopt_stored_prefix
from ..attention.sequence import SequenceKV
from ..blocks import BlockKey, BlockLayout, CorruptRecordError
from ..config import Config
from ..errors import RemoteBlockLostError, StoreDamagedError, TierError, TierFullError
from ..tiers.manager import TierManager
from .records import (
    CorruptSessionError,
    ModelIdentity,
    SessionError,
    SessionInfo,
    SessionLockedError,
    SessionMismatchError,
    SessionRecord,
    check_name,
)
from .lazy_pull import LazyPull
from .pulled import PulledSession
from .remote import RemoteSync
from .rows import common_blocks, decode_tail_value
from .store import SessionStore
from .summary_runs import encode_run

log = logging.getLogger(__name__)
RUN_BLOCKS = 512  # blocks per summary run: 23 MB of SmolLM2 summaries built at a time


class SessionCache(Protocol):
    """What a session needs of its cache (an :class:`~hkv.integrations.transformers.HkvCache`)."""

    sequence: SequenceKV

    def append_kv(self, token_ids: torch.Tensor, keys: Any, values: Any = None) -> None: ...
    def sync_lengths(self) -> None: ...
    def close(self) -> None: ...


class SessionHost(Protocol):
    """The runtime seen from a session (:class:`hkv.integrations.runtime.Runtime` is one)."""

    config: Config
    layout: BlockLayout
    manager: TierManager
    open_sessions: dict[str, Session]
    remote_sync: RemoteSync | None

    @property
    def num_layers(self) -> int: ...
    def session_store(self) -> SessionStore: ...
    def token_ids(self, input_ids: Any, *, allow_empty: bool = False) -> torch.Tensor: ...
    def check_generate_options(self, generate_kwargs: dict[str, Any]) -> None: ...
    def model_identity(self, tokenizer: Any = None) -> ModelIdentity: ...
    def new_cache(self, *, persist: bool = False) -> SessionCache: ...
    def fill(self, cache: SessionCache, token_ids: torch.Tensor, *, progress: bool | None = None) -> int: ...
    def fill_for_generate(self, cache: SessionCache, token_ids: torch.Tensor, *, progress: bool | None = None) -> None: ...
    def generate_with(self, cache: SessionCache, input_ids: torch.Tensor, **generate_kwargs: Any) -> Any: ...


@dataclass(slots=True)
class RestoreReport:
    """How a session was opened. Times in seconds."""

    tokens: int  # conversation tokens in the record
    kv_tokens: int  # tokens whose KV was restored from the store (lazily: blocks stay on disk)
    adopted_blocks: int  # per layer, referenced without reading (plus the pinned sink / local ones, read)
    tail_tokens: int  # tokens of the unsealed tail restored from the tail record
    pending_tokens: int  # tokens whose KV is missing (evicted, or never computed) and is prefilled at the next call
    seconds: float
    new: bool  # True when the session did not exist before


class Session(PulledSession):
    """One named conversation: its tokens, its cache, its writer lock. Create with ``rt.session(name)``.

    ``tokens``: ``[n]`` int64 on the CPU, the whole conversation (prompts and replies). The KV of
    every token but the last is in the cache (after a call returns); the last one's KV is
    computed by the next call. Not thread-safe (one conversation, one caller).

    After an error in the middle of a call (a corrupt block, a full store...) the session is
    *broken*: its cache may hold part of a forward, so it is never committed again; close it and
    reopen it to continue from its last commit. A block of a lazy pull lost on the remote tier is
    not such an error: the session pulls itself whole and runs the call again (docs/remote.md).
    """

    name: str
    restored: RestoreReport
    background_pull: bool = True  # a lazily pulled session: fetch the rest of its blocks in a thread after its first call

    def __init__(self, runtime: SessionHost, name: str, *, tokenizer: Any = None, autocommit: bool = True) -> None:
        started = time.perf_counter()
        self.name = check_name(name)
        self.runtime, self.autocommit = runtime, autocommit
        self._closed, self._broken, self._cache, self._lock = True, None, None, None
        self._lazy: LazyPull | None = None  # a lazy pull not yet settled (its blocks partly on the remote tier)
        if name in runtime.open_sessions:
            raise SessionLockedError(f"session {name!r} is already open in this process; close it before opening it again")
        self._store = runtime.session_store()
        self._lock = self._store.lock(name)
        self._remote = runtime.remote_sync if runtime.config.remote.sessions else None
        try:
            if self._remote is not None:
                self._take_remote_lease()
            self._cache = runtime.new_cache(persist=True)
            record = self._store.get(name)
            if self._remote is not None:
                record = self._remote_record(record)  # another machine's session (or later commit)
            self._identity = runtime.model_identity(tokenizer)
            if record is not None:
                self._check(record)
                if self._identity.tokenizer is None:
                    self._identity.tokenizer = record.identity.tokenizer  # keep what was recorded
            self._record = record
            try:
                try:
                    self.restored = self._restore(record, started)
                except RemoteBlockLostError as error:
                    if self._lazy is None:
                        raise
                    self._recover(error, started)
            except (CorruptRecordError, StoreDamagedError) as error:  # a pinned sink / local block read now, or the tail
                raise CorruptSessionError(f"session {name!r}: a stored block is corrupt: {error}") from error
        except BaseException:
            try:
                if self._cache is not None:
                    self._cache.close()
                self._drop_lazy()
            finally:
                if self._remote is not None:
                    self._remote.release(name)
                self._lock.release()
            raise
        runtime.open_sessions[name] = self
        self._closed = False

    # -- opening ---------------------------------------------------------------------------------

    def _take_remote_lease(self) -> None:
        taken = self._remote.acquire(self.name)
        if taken is False:
            raise SessionLockedError(
                f"session {self.name!r} is open for writing on another machine (its lease on the remote tier "
                f"{self.runtime.config.remote.url}); close it there, or wait for the lease to expire"
            )

    def _layout(self) -> dict[str, object]:
        layout = self.runtime.layout
        return {"kv_heads": layout.kv_heads, "block_tokens": layout.block_tokens, "head_dim": layout.head_dim,
                "dtype": str(layout.dtype).removeprefix("torch.")}  # fmt: skip

    def _check(self, record: SessionRecord) -> None:
        """SessionMismatchError naming every field in which the record's model or layout differs."""
        lines = record.identity.differences(self._identity)
        layout = self._layout()
        lines += [f"layout {key}: stored {record.layout.get(key)}, this runtime {value}"
                  for key, value in layout.items() if record.layout.get(key) != value]  # fmt: skip
        if lines:
            raise SessionMismatchError(
                f"session {self.name!r} was saved by another model or block layout; refusing to use its KV:\n  " + "\n  ".join(lines)
            )

    @torch.inference_mode()
    def _restore(self, record: SessionRecord | None, started: float) -> RestoreReport:
        """Adopt the record's blocks (up to the first missing one) and its tail."""
        if record is None:
            self._tokens = torch.empty(0, dtype=torch.long)
            self._committed = (0, 0, 0)  # (tokens, kv_blocks, kv_tokens) at the last commit or restore
            self._run_end = 0  # leading blocks the session's summary runs cover
            return RestoreReport(0, 0, 0, 0, 0, time.perf_counter() - started, True)
        self._tokens = torch.from_numpy(np.asarray(record.token_ids, dtype=np.int64).copy())
        bt = self.runtime.layout.block_tokens
        seq = self._cache.sequence
        digests = record.key_digests()  # block-major
        by_layer = [digests[layer :: record.num_layers] for layer in range(record.num_layers)]
        lazy, layout = self._lazy, self.runtime.layout
        if lazy is not None:  # the summaries came from the server; the blocks come when read
            known = lazy.summary_arrays(by_layer, seq.summaries.relative, layout.summary_floats)
            if known is None:
                raise RemoteBlockLostError(f"session {self.name!r}: a block's summary is missing on the remote tier", [])
            self.runtime.manager.learn_remote([BlockKey(digest) for digest in lazy.remote_keys], lazy)
            lazy.attach(self.runtime.manager.remote_blocks)
            known = [[layer_summaries] for layer_summaries in known]
            covered = 0  # the local store has none of its summary runs: the first commit writes them
        else:
            runs = self._store.read_summary_runs(self.name, by_layer, seq.summaries.relative)
            known = [[torch.from_numpy(run) for run in layer_runs] for layer_runs in runs]
            covered = sum(len(run) for run in runs[0]) if runs else 0
        keys = [[BlockKey(digest) for digest in layer_digests] for layer_digests in by_layer]
        adopted = adopt_stored_prefix(seq, self._tokens[: record.kv_blocks * bt], known_keys=keys, known_summaries=known) // bt
        self._run_end = min(adopted, covered)
        self._cache.sync_lengths()
        tail = 0
        if adopted == record.kv_blocks and record.tail_tokens:
            tail = record.tail_tokens
            kv = torch.empty(self.runtime.num_layers, 2, layout.kv_heads, tail, layout.head_dim, dtype=layout.dtype)
            if lazy is not None:
                decode_tail_value(lazy.tail, self.name, kv.view(self.runtime.num_layers * 2, layout.kv_heads, tail, layout.head_dim))
            else:
                self._store.read_tail(record, kv)
            start = adopted * bt
            self._cache.append_kv(self._tokens[start : start + tail], lambda layer: (kv[layer, 0], kv[layer, 1]))
        kv_tokens = self.kv_tokens
        # A partial restore (blocks this process cannot use: evicted, or stored by another process
        # after this one opened the store) is not a change: committing it would drop the record's
        # references to intact blocks, so only new tokens or new KV are committed.
        self._committed = (len(self._tokens), adopted, kv_tokens)
        return RestoreReport(len(self._tokens), kv_tokens, adopted, tail, max(0, len(self._tokens) - 1 - kv_tokens),
                             time.perf_counter() - started, False)  # fmt: skip

    # -- state -----------------------------------------------------------------------------------

    @property
    def tokens(self) -> torch.Tensor:
        return self._tokens.clone()

    @property
    def kv_tokens(self) -> int:
        """Tokens whose KV is in the cache (at most ``len(tokens) - 1`` after a call)."""
        return self._cache.sequence.seq_length() if self._cache is not None else 0

    # -- calls -----------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, *, progress: bool | None = None, **generate_kwargs: Any) -> Any:
        """Append ``input_ids`` (``[1, S]`` or ``[S]``, the new turn) and generate the reply like
        ``model.generate`` (same kwargs; batch 1). Returns what generate returns, over the WHOLE
        conversation (``[1, n_tokens]`` by default); the reply is ``out[:, -new:]``. Commits when
        ``autocommit``."""
        self._check_usable()
        if "cache" in generate_kwargs or "past_key_values" in generate_kwargs:
            raise ValueError("a session generates with its own cache; do not pass cache / past_key_values")
        mask = generate_kwargs.pop("attention_mask", None)
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError("hkv does not support padding: attention_mask has zeros (batch size 1, no padding tokens)")
        self.runtime.check_generate_options(generate_kwargs)
        tokens = torch.cat([self._tokens, self.runtime.token_ids(input_ids, allow_empty=True)[0]])
        if len(tokens) == 0:
            raise ValueError("input_ids is empty and the session has no tokens yet")
        self._check_disk_room(len(tokens) + int(generate_kwargs.get("max_new_tokens") or 0))
        with self._guard():
            return self._call(lambda: self._generate_turn(tokens, progress, generate_kwargs))

    def _generate_turn(self, tokens: torch.Tensor, progress: bool | None, generate_kwargs: dict[str, Any]) -> Any:
        self.runtime.fill_for_generate(self._cache, tokens[self.kv_tokens :], progress=progress)
        out = self.runtime.generate_with(self._cache, tokens.unsqueeze(0), **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        self._tokens = sequences[0].detach().to("cpu", torch.long).clone()
        if self._lazy is not None and self.background_pull:
            self._lazy.start_background()  # the rest of the session's blocks, now that the reply is out
        if self.autocommit:  # inside: a turn whose commit failed is not committed at close either
            self.commit()
        return out

    def append(self, input_ids: torch.Tensor, *, progress: bool | None = None) -> None:
        """Add tokens (a document, a turn) without generating; their KV is computed now (all but
        the last token's, like after :meth:`generate`). Commits when ``autocommit``."""
        self._check_usable()
        tokens = torch.cat([self._tokens, self.runtime.token_ids(input_ids, allow_empty=True)[0]])
        self._check_disk_room(len(tokens))
        with self._guard():
            self._call(lambda: self._append(tokens, progress))

    def _append(self, tokens: torch.Tensor, progress: bool | None) -> None:
        self.runtime.fill(self._cache, tokens[self.kv_tokens : -1], progress=progress)
        self._tokens = tokens
        if self.autocommit:
            self.commit()

    def _check_disk_room(self, tokens: int) -> None:
        """Every sealed block of a session is stored on disk: refuse, before any work, a turn
        after which the session's blocks alone would not fit ``tiers.disk`` (evicting other
        sessions' KV could not make it fit). TierFullError naming ``tiers.disk``."""
        seq, manager = self._cache.sequence, self.runtime.manager
        need = tokens // seq.block_tokens * self.runtime.num_layers
        if need > manager.disk_capacity_blocks:
            raise TierFullError(
                f"session {self.name!r}: after this turn its {tokens} tokens would need {need} blocks on disk "
                f"({need * manager.disk_record_nbytes} bytes), more than tiers.disk = {manager.disk_capacity} bytes "
                f"holds ({manager.disk_capacity_blocks} blocks); raise tiers.disk (nothing was computed or committed)"
            )

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Mark the session broken when a call fails midway; a corrupt block becomes a
        CorruptSessionError naming the session."""
        try:
            yield
        except (CorruptRecordError, StoreDamagedError) as error:
            self._broken = f"{type(error).__name__}: {error}"
            raise CorruptSessionError(f"session {self.name!r}: a stored block is corrupt: {error}") from error
        except BaseException as error:
            self._broken = f"{type(error).__name__}: {error}"
            raise

    def _check_usable(self) -> None:
        if self._closed:
            raise SessionError(f"session {self.name!r} is closed")
        if self._broken is not None:
            raise SessionError(f"session {self.name!r} failed ({self._broken}); close it and reopen it to continue from its last commit")

    # -- commit ----------------------------------------------------------------------------------

    def commit(self) -> None:
        """Make the conversation so far durable (one atomic store transaction). A no-op when
        nothing changed since the last commit. A lazily pulled session fetches the rest of its
        blocks first (its local record names local blocks only)."""
        self._check_usable()
        if self._lazy is not None:
            with self._guard():
                if self._settle_lazy():
                    return
        seq = self._cache.sequence
        n_blocks = seq.sealed_blocks()
        if self._record is not None and (len(self._tokens), n_blocks, self.kv_tokens) == self._committed:
            return
        manager = self.runtime.manager
        manager.flush()  # the written-through blocks (and their summaries) are durable first
        layers = seq.num_layers
        keys = [seq.block_keys(layer) for layer in range(layers)]
        block_keys = [keys[layer][i] for i in range(n_blocks) for layer in range(layers)]
        # A session's blocks are written through with their summaries as they seal (its cache is
        # persist=True; flushed above): only those whose block was not stored then are sent again
        # (sending all would write every summary twice: 720 MB at 1M tokens, built in memory first).
        unsummarised = seq.unsummarised_blocks()
        summary_keys = [keys[layer][i] for layer, indices in unsummarised.items() for i in indices]
        summaries = torch.cat([seq.block_summaries(layer, indices) for layer, indices in unsummarised.items() if indices]) if summary_keys else None
        tail = seq.tail_kv()
        kv_tokens = seq.seq_length()
        now = time.time()
        previous = self._record
        record = SessionRecord(
            name=self.name,
            identity=self._identity,
            layout=self._layout(),
            token_ids=self._tokens.numpy().astype(np.int64),
            kv_tokens=kv_tokens,
            kv_blocks=n_blocks,
            tail_tokens=kv_tokens - n_blocks * seq.block_tokens,
            created=previous.created if previous is not None else now,
            updated=now,
            last_used=now,
            commits=previous.commits if previous is not None else 0,
        )
        result = self._store.commit(record, block_keys=block_keys, summaries=summaries, summary_keys=summary_keys, tail=tail,
                                    relative=seq.summaries.relative)  # fmt: skip
        seq.summaries_committed(unsummarised)
        manager.apply_store_changes(result)
        self._run_end = min(self._run_end, common_blocks(previous, record) if previous is not None else 0)
        self._record = record
        self._committed = (len(self._tokens), n_blocks, kv_tokens)
        self._write_summary_runs(keys, n_blocks)
        if self._remote is not None:
            self._remote.push_later(self.name)  # the local commit is durable; the remote copy follows

    def _write_summary_runs(self, keys: list[list[BlockKey]], n_blocks: int) -> None:
        """After a commit: the summaries of the blocks past the session's runs, as runs of at
        most RUN_BLOCKS blocks (memory stays bounded), each its own small transaction. Runs are a
        copy that only makes resuming faster: one that cannot be written is skipped, logged."""
        seq = self._cache.sequence
        raw = [[bytes(key) for key in layer_keys] for layer_keys in keys]
        while self._run_end < n_blocks:
            first = self._run_end
            count = min(RUN_BLOCKS, n_blocks - first)
            summaries = torch.stack([seq.summaries.export(layer, first, first + count) for layer in range(seq.num_layers)])
            value = encode_run(first, raw, summaries.cpu(), seq.summaries.relative, compact=self._store.disk.compact_summaries)
            try:
                written = self._store.put_summary_run(self.name, first, count, value)
            except TierError as error:
                log.warning("session %r: its summary run of blocks %d-%d was not written (%s); resuming reads them one by one",
                            self.name, first, first + count, error)  # fmt: skip
                return
            if not written:
                return
            self._run_end = first + count

    def info(self) -> SessionInfo:
        """What ``hkv sessions show`` reports, from the store (commit first to see the latest)."""
        return self._store.info(self.name)

    def close(self) -> None:
        """Commit (when ``autocommit``), release the cache and the writer lock. Idempotent."""
        if self._closed:
            return
        try:
            if self.autocommit and self._broken is None:
                self.commit()
            elif self._lazy is not None and self._broken is None:
                self._close_lazy()
        finally:
            self._closed = True
            self.runtime.open_sessions.pop(self.name, None)
            try:
                self._cache.close()
                self._drop_lazy()
            finally:
                if self._remote is not None:
                    self._remote.release_after_push(self.name)  # another machine then pulls this commit
                self._lock.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("broken" if self._broken else "open")
        return f"Session({self.name!r}, {len(self._tokens)} tokens, {self.kv_tokens} with KV, {state})"
