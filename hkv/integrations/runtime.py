"""The runtime: a wrapped model with its tier manager, prefetcher and per-sequence caches.

``rt = hkv.wrap(model, config)`` checks that hkv can serve the model (refusing it otherwise,
before changing anything), builds the :class:`~hkv.tiers.manager.TierManager` for the model's
block layout and the :class:`~hkv.prefetch.prefetcher.Prefetcher`, and routes the model's
attention to hkv (:class:`~hkv.integrations.transformers.ModelHooks`). Each generation gets its
own :class:`~hkv.integrations.transformers.HkvCache` over a :class:`~hkv.attention.sequence.SequenceKV`.

The runtime is also the one seam between a model and its sessions (:mod:`hkv.sessions`): a
:class:`~hkv.sessions.session.Session` fills and generates through :meth:`Runtime.fill` and
:meth:`Runtime.generate_with`, the same two calls :meth:`Runtime.generate` makes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..attention.prefix import Span, adopt_stored_prefix, stored_spans
from ..attention.selection import SelectionObserver
from ..attention.sequence import SequenceKV
from ..attention.stats import SequenceStats
from ..blocks import BlockLayout
from ..config import Config
from ..errors import TierError
from ..memory import steady_heap, trim_heap
from ..positions import RotaryShift
from ..prefetch.prefetcher import Prefetcher
from ..sessions.records import ModelIdentity
from ..remote.client import RemoteStore
from ..sessions.remote import RemoteSync
from ..sessions.session import Session
from ..sessions.store import SessionStore
from ..tiers.manager import TierManager
from .model import ModelSpec, kv_fingerprint, model_identity, storage_dtype
from .next_layer import NextLayerHooks
from .transformers import HkvCache, ModelHooks, check_not_wrapped, check_padding

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RuntimeStats:
    """What :meth:`Runtime.stats` reports. Bytes are payload bytes, times seconds."""

    tiers: dict[str, dict[str, int]]  # name -> used_bytes, capacity_bytes, blocks
    device_peak_bytes: int  # most device-tier bytes seen after any forward of this runtime
    moved_bytes: dict[str, int]
    evictions: dict[str, int]
    prefetch: SequenceStats | None  # the SequenceKV stats of the current / last sequence (None before the first)
    prompt_tokens: int = 0  # prompt tokens computed, those a short run leaves to generate's first forward included
    generated_tokens: int = 0
    prefill_s: float = 0.0  # in the chunked prefill (Runtime.prefill) only
    generate_s: float = 0.0  # in the model's generate, its first forward over a short run included
    forwards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Runtime:
    """A wrapped model: the tier manager, the prefetcher and the hooks that route attention to hkv.

    Create with :func:`wrap`. Use as a context manager or call :meth:`close`, which restores the
    model's original attention implementation.
    """

    def __init__(self, model: torch.nn.Module, config: Config | None = None, *, device: torch.device | str | None = None) -> None:
        check_not_wrapped(model)  # refusals happen here, before anything changes
        steady_heap()  # decode-step temporaries stay in the heap (hkv.memory)
        self.spec = ModelSpec.of(model)
        self.config = config if config is not None else Config()
        # attention.positions = "remap" re-rotates keys with the model's own RoPE frequencies;
        # refused here (RemapUnsupportedError) for models whose rotation is not shift-invariant
        self.rotary = RotaryShift.of(model) if self.config.attention.positions == "remap" else None
        self.model = model
        self.dtype = storage_dtype(self.config, self.spec.dtype)
        self.fingerprint = kv_fingerprint(model, dtype=self.dtype, attention=self.config.attention)  # block keys
        self.layout = BlockLayout(self.spec.num_kv_heads, self.config.attention.block_tokens, self.spec.head_dim, self.dtype)
        if device is None and self.config.tiers.accelerator == "auto":
            device = self.spec.device
        wanted = torch.device(device if device is not None else self.config.tiers.accelerator)
        if wanted.type != self.spec.device.type:
            raise ValueError(
                f"the model is on {self.spec.device} but the device tier would be on {wanted} "
                f"(tiers.accelerator = {self.config.tiers.accelerator!r}); move the model or set tiers.accelerator = \"auto\""
            )
        self.manager = TierManager(self.config, self.layout, device=device)
        self.prefetcher = None
        self._hooks: ModelHooks | None = None
        self._next_layer: NextLayerHooks | None = None
        self._caches: weakref.WeakSet[HkvCache] = weakref.WeakSet()  # open caches, held weakly
        self._current: weakref.ref[HkvCache] | None = None  # the newest open cache
        self._orphans: list[SequenceKV] = []  # of caches collected unclosed, closed by _drain_orphans
        self._last_sequence_stats: SequenceStats | None = None
        self._closed = False
        self._device_peak = 0
        self._counters = {"prompt_tokens": 0, "generated_tokens": 0, "prefill_s": 0.0, "generate_s": 0.0, "forwards": 0}
        self._reused_tokens = 0  # prompt tokens adopted from the store instead of prefilled (prefix reuse)
        self.open_sessions: dict[str, Session] = {}  # name -> open session (each adds and removes itself)
        self._session_store: SessionStore | None = None
        self.remote_sync: RemoteSync | None = None  # the remote tier's pushes and pulls ([remote]), made with the session store
        try:
            if self.config.prefetch.on(gpu=self.manager.device.type == "cuda"):
                self.prefetcher = Prefetcher(self.manager, workers=self.config.prefetch.workers, job_blocks=self.config.prefetch.job_blocks)
            self._hooks = ModelHooks(model, self, after_forward=self._after_forward)
            if self.prefetcher is not None and self.config.prefetch.next_layer and self.config.attention.mode != "exact":
                self._next_layer = NextLayerHooks.install(model)
            self.new_cache().close()  # a config whose device tier cannot hold the pinned blocks fails here
            self._last_sequence_stats = None
        except BaseException:
            self.close()
            raise

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    # -- caches --------------------------------------------------------------------------------

    def new_cache(self, *, persist: bool = False, on_selection: SelectionObserver | None = None) -> HkvCache:
        """A fresh, empty cache for one sequence; use with ``model.generate(ids, cache=cache)``.

        Close it when done, best with ``with rt.new_cache() as cache: model.generate(ids, cache=cache)``.
        The runtime holds caches weakly: the blocks of a cache garbage collected unclosed are
        released at the next ``new_cache`` / :meth:`stats` / :meth:`close` (so
        ``model.generate(ids, cache=rt.new_cache())`` works repeatedly), and :meth:`close` closes
        the caches still open. ``persist``: its sealed blocks are written through to the store
        (a session's cache). ``on_selection``: called with a
        :class:`~hkv.attention.selection.SelectionEvent` for every block selection the cache's
        attention makes (each query chunk of each layer: which sealed blocks it reads); it may
        return a :class:`~hkv.attention.selection.Selection` to read instead, None to keep it
        (a diagnosis hook, e.g. ``scripts/passkey_selection.py``)."""
        self._check_open()
        self._drain_orphans()
        spec = self.spec
        sequence = SequenceKV(
            self.manager,
            self.config,
            num_layers=spec.num_layers,
            num_kv_heads=spec.num_kv_heads,
            num_q_heads=spec.num_q_heads,
            head_dim=spec.head_dim,
            dtype=self.dtype,
            fingerprint=self.fingerprint,
            prefetcher=self.prefetcher,
            rotary=self.rotary,
            persist=persist,
            on_selection=on_selection,
            predicted_ahead=self._next_layer is not None and not self._next_layer.failed,
        )
        cache = HkvCache(sequence, spec, self, self._retire)
        # A cache collected unclosed only queues its sequence (list.append is safe wherever the
        # garbage collector runs, even inside a lock); the next new_cache / stats / close closes it.
        cache._finalizer = weakref.finalize(cache, self._orphans.append, sequence)
        cache._finalizer.atexit = False
        self._caches.add(cache)
        self._current = weakref.ref(cache)
        return cache

    def _retire(self, cache: HkvCache) -> None:
        """Called by ``cache.close()`` (which then closes the sequence)."""
        self._caches.discard(cache)
        if cache._finalizer is not None:
            cache._finalizer.detach()
        self._last_sequence_stats = cache.sequence.stats()

    def _drain_orphans(self) -> None:
        while self._orphans:
            sequence = self._orphans.pop()
            if not sequence._closed:
                self._last_sequence_stats = sequence.stats()
                sequence.close()

    # -- generation ----------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, cache: HkvCache, *, progress: bool = False) -> None:
        """Run ``input_ids`` ``[1, S]`` through the model into ``cache`` in chunks of
        ``attention.prefill_chunk_tokens`` (only the last position's logits are computed)."""
        input_ids = _as_batch_one(input_ids)
        chunk = self.config.attention.prefill_chunk_tokens
        total = input_ids.shape[1]
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="tok", desc="hkv prefill")
        start = time.perf_counter()
        try:
            for begin in range(0, total, chunk):
                piece = input_ids[:, begin : begin + chunk].to(self.spec.device)
                self.model(input_ids=piece, cache=cache, use_cache=True, **keep)
                trim_heap()  # the chunk's temporaries, freed, would otherwise stay in the heap
                if bar is not None:
                    bar.update(piece.shape[1])
        finally:
            if bar is not None:
                bar.close()
            self._counters["prefill_s"] += time.perf_counter() - start
            self._counters["prompt_tokens"] += total

    def generate(self, input_ids: torch.Tensor, *, progress: bool | None = None, **generate_kwargs: Any) -> Any:
        """Like ``model.generate(input_ids, **generate_kwargs)`` with the KV in hkv.

        The prompt is filled as :meth:`fill_for_generate` says (a long one but its last token:
        stored prefix adopted, the rest prefilled in chunks; ``progress``: a tqdm bar, default
        on for more than 8 chunks to prefill; a short one not at all), then the model's own
        ``generate`` continues with the cache. Batch size
        1; ``attention_mask`` may be given but must be all ones. Returns what ``generate``
        returns (by default ``[1, S + new]`` token ids).
        """
        self._check_open()
        if "cache" in generate_kwargs or "past_key_values" in generate_kwargs:
            raise ValueError("rt.generate makes its own cache; use model.generate(..., cache=rt.new_cache()) to pass one")
        self.check_generate_options(generate_kwargs)
        input_ids = self.token_ids(input_ids).to(self.spec.device)
        mask = generate_kwargs.pop("attention_mask", None)
        if mask is not None:
            check_padding(mask)
            if mask.shape[1] != input_ids.shape[1]:
                raise ValueError(f"attention_mask has {mask.shape[1]} positions for {input_ids.shape[1]} input ids")
        with self.new_cache() as cache:
            self.fill_for_generate(cache, input_ids[0], progress=progress)
            out = self.generate_with(cache, input_ids, **generate_kwargs)
            if self.config.remote.url and self.config.remote.prefixes:
                self._push_prefix(cache.sequence)
            return out

    def _push_prefix(self, sequence: SequenceKV) -> None:
        """``remote.prefixes``: copy the sequence's stored blocks to the server, in the background
        (after their write-through to the local store, waited for here)."""
        self.session_store()  # the remote tier comes with the session store
        try:
            self.manager.flush()
        except TierError as error:  # the reply stands; its blocks are not all stored, so none is pushed
            log.warning("remote tier: the blocks of this prompt are not pushed: %s", error)
            return
        keys = [sequence.block_keys(layer) for layer in range(self.num_layers)]
        block_major = [bytes(keys[layer][i]) for i in range(sequence.sealed_blocks()) for layer in range(self.num_layers)]
        if block_major:
            self.remote_sync.push_blocks_later(block_major, self.num_layers)

    def token_ids(self, input_ids: torch.Tensor | Sequence[int], *, allow_empty: bool = False) -> torch.Tensor:
        """``input_ids`` (``[S]`` or ``[1, S]``, integers) as ``[1, S]`` int64 on the CPU, checked:
        batch size 1, ids in ``[0, vocab_size)`` of the model; ValueError naming the problem
        otherwise (before anything is computed or stored)."""
        ids = _as_batch_one(input_ids, allow_empty=allow_empty)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
        ids = ids.to("cpu", torch.long)
        vocab = self.spec.vocab_size
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or (vocab is not None and high >= vocab):
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab}) (input_ids of {ids.shape[1]} tokens)")
        return ids

    def check_generate_options(self, generate_kwargs: dict[str, Any]) -> None:
        """Refuse ``generate`` options that need several sequences (beams, several returned
        sequences): hkv serves one. ValueError naming the option."""
        for key in ("num_beams", "num_return_sequences", "num_beam_groups"):
            value = generate_kwargs.get(key)
            if value is not None and value != 1:
                raise ValueError(f"hkv serves one sequence (batch size 1): {key} = {value} is not supported; use {key}=1")

    def fill(self, cache: HkvCache, token_ids: torch.Tensor, *, progress: bool | None = None) -> int:
        """Compute the KV of ``token_ids`` (``[S]``, the tokens that follow the cache's current
        length) into ``cache``: with ``store.reuse_prefix`` (when a store exists), every run of
        complete blocks the store holds is adopted and only the tokens between and after those
        runs are prefilled, in chunks, with the KV before them as context
        (:func:`~hkv.attention.prefix.stored_spans`; a block missing in the middle, evicted or
        lost with a remote node, costs its own tokens); ``progress``: a tqdm bar, default on for
        more than 8 chunks to prefill. Returns the tokens adopted."""
        token_ids = token_ids.reshape(-1)
        if not len(token_ids):
            return 0
        remote = self.config.remote
        if self.config.store.reuse_prefix and remote.url and (remote.sessions or remote.prefixes):
            self.session_store()  # the remote tier comes with the session store
            self.remote_sync.fetch_prefix(cache.sequence, token_ids)  # the server's blocks the local store lacks
        if self.config.store.reuse_prefix and self.manager.has_store():
            spans = stored_spans(cache.sequence, token_ids)
        else:
            spans = [Span(0, len(token_ids), False)]
        if progress is None:
            rest = sum(span.end - span.start for span in spans if not span.stored)
            progress = rest > 8 * self.config.attention.prefill_chunk_tokens
        adopted, bt = 0, self.layout.block_tokens
        for span in spans:
            start = span.start
            while span.stored and start < span.end:
                got = adopt_stored_prefix(cache.sequence, token_ids[start : span.end])
                cache.sync_lengths()
                adopted += got
                start += got
                if start < span.end:  # a block without its summary, or gone since: computed alone
                    self.prefill(token_ids[start : start + bt].unsqueeze(0), cache)
                    start += bt
            if start < span.end:
                self.prefill(token_ids[start : span.end].unsqueeze(0), cache, progress=progress)
        self._reused_tokens += adopted
        return adopted

    def fill_for_generate(self, cache: HkvCache, token_ids: torch.Tensor, *, progress: bool | None = None) -> None:
        """Before :meth:`generate_with`: put in ``cache`` the KV of the tokens of ``token_ids``
        (``[S]``, those after the cache's length, the last one included) that ``generate``'s own
        first forward does not compute. A long run is filled (:meth:`fill`) but its last token.
        A short one (at most ``attention.prefill_chunk_tokens``, no complete block of it in the
        store, no remote prefix tier) is left whole to ``generate``: one pass over the layers,
        one block selection and one round of block reads for the new turn and its first token,
        instead of a fill's and then a one-token step's. In sparse mode the first token then
        attends the blocks chosen for the whole run (scored by its every query, as in any
        prefill chunk) rather than its own."""
        token_ids = token_ids.reshape(-1)
        if self._generate_takes_all(cache, token_ids):
            self._counters["prompt_tokens"] += len(token_ids) - 1
            return
        self.fill(cache, token_ids[:-1], progress=progress)

    def _generate_takes_all(self, cache: HkvCache, token_ids: torch.Tensor) -> bool:
        if not 1 < len(token_ids) <= self.config.attention.prefill_chunk_tokens:
            return False
        remote = self.config.remote
        if remote.url and (remote.sessions or remote.prefixes):
            return False  # fill asks the server for the blocks the local store lacks
        if self.config.store.reuse_prefix and self.manager.has_store():
            return not any(span.stored for span in stored_spans(cache.sequence, token_ids[:-1]))
        return True

    def generate_with(self, cache: HkvCache, input_ids: torch.Tensor, **generate_kwargs: Any) -> Any:
        """``model.generate(input_ids, cache=cache, **generate_kwargs)`` with an all-ones
        attention mask, timed and counted in :meth:`stats`; ``input_ids`` ``[1, S]``, the whole
        sequence, whose KV up to where :meth:`fill_for_generate` left it is in ``cache``."""
        input_ids = input_ids.to(self.spec.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, cache=cache, attention_mask=torch.ones_like(input_ids), **generate_kwargs)
        self._counters["generate_s"] += time.perf_counter() - start
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        self._counters["generated_tokens"] += sequences.shape[1] - input_ids.shape[1]
        return out

    def session(self, name: str, *, tokenizer: Any = None, autocommit: bool = True) -> Session:
        """Open (or create) the persistent conversation ``name`` in the store: a
        :class:`hkv.sessions.Session` (a context manager). ``tokenizer``: recorded (a hash of its
        vocabulary) and checked on resume when given. Raises SessionNameError, SessionLockedError,
        SessionMismatchError, CorruptSessionError (see :mod:`hkv.sessions`)."""
        self._check_open()
        return Session(self, name, tokenizer=tokenizer, autocommit=autocommit)

    def session_store(self) -> SessionStore:
        """The store's :class:`~hkv.sessions.store.SessionStore` (opens or creates the disk
        store); registers, once, the disk-budget reclaimer that drops the KV of least-recently-used
        sessions not open here (``store.evict_sessions``)."""
        self._check_open()
        if self._session_store is None:
            store = self._session_store = SessionStore(self.manager.store)
            remote = self.config.remote
            if remote.url and (remote.sessions or remote.prefixes):
                self.remote_sync = RemoteSync(RemoteStore(remote), store, lambda: list(self.open_sessions))
            if self.config.store.evict_sessions:
                manager, open_names = self.manager, self.open_sessions
                manager.set_reclaimer(lambda need: store.reclaim(need, skip=set(open_names), in_use=manager.in_use))
        return self._session_store

    def model_identity(self, tokenizer: Any = None) -> ModelIdentity:
        """What a session records of this runtime's model and checks on resume
        (:func:`~hkv.integrations.model.model_identity`)."""
        return model_identity(self.model, self.dtype, tokenizer, self.config.attention)

    def _after_forward(self) -> None:
        self._counters["forwards"] += 1
        self._device_peak = max(self._device_peak, self.manager.stats().tiers["device"].used_bytes)

    # -- stats and lifetime ----------------------------------------------------------------------

    def stats(self) -> RuntimeStats:
        """Tier usage, bytes moved, the current (or last) sequence's prefetch stats, token counts."""
        self._check_open()
        self._drain_orphans()
        snapshot = self.manager.stats()
        tiers = {
            name: {"used_bytes": u.used_bytes, "capacity_bytes": u.capacity_bytes, "blocks": u.blocks}
            for name, u in snapshot.tiers.items()
        }
        self._device_peak = max(self._device_peak, tiers["device"]["used_bytes"])
        current = self._current() if self._current is not None else None
        sequence_stats = current.sequence.stats() if current is not None and not current._closed else self._last_sequence_stats
        return RuntimeStats(
            tiers=tiers,
            device_peak_bytes=self._device_peak,
            moved_bytes=dict(snapshot.moved_bytes),
            evictions=dict(snapshot.evictions),
            prefetch=sequence_stats,
            **self._counters,
            extra={"reused_tokens": self._reused_tokens},
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this hkv Runtime is closed")

    def close(self) -> None:
        """Close open sessions (committing those with autocommit) and caches, stop the prefetcher,
        close the tiers, restore the model. Idempotent; a failed commit is raised after all that."""
        if self._closed:
            return
        self._closed = True
        errors = []
        try:
            for session in list(getattr(self, "open_sessions", {}).values()):
                try:
                    session.close()  # commits (autocommit) while the manager is still open
                except Exception as error:  # the others still close; the first failure is raised below
                    errors.append(error)
        finally:  # even on KeyboardInterrupt: the hooks come off, the store is closed
            self._close_rest()
        if errors:
            raise errors[0]

    def _close_rest(self) -> None:
        """Everything :meth:`close` does after the sessions."""
        if self.remote_sync is not None:
            self.remote_sync.close()  # the last commits' pushes first (bounded wait)
        for cache in list(getattr(self, "_caches", ())):
            cache.close()
        if hasattr(self, "_orphans"):
            self._drain_orphans()
        if getattr(self, "_next_layer", None) is not None:
            self._next_layer.remove()
        if self._hooks is not None:
            self._hooks.remove()
        if self.prefetcher is not None:
            self.prefetcher.close()
        manager = getattr(self, "manager", None)
        if manager is not None:
            manager.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Runtime({type(self.model).__name__}, {s.num_layers} layers, {s.num_q_heads}/{s.num_kv_heads} heads x "
            f"{s.head_dim}, mode={self.config.attention.mode}, {'closed' if self._closed else 'open'})"
        )


def wrap(model: torch.nn.Module, config: Config | dict | str | None = None, *, device: torch.device | str | None = None) -> Runtime:
    """Serve ``model`` (a transformers causal LM) with hkv; refuses models it cannot serve.

    ``config``: a :class:`~hkv.config.Config`, a dict or a TOML path; None: the defaults. Except
    for a ``Config`` (taken as it is), the ``HKV_*`` environment variables apply on top
    (:meth:`Config.load`).
    """
    if not isinstance(config, Config):
        config = Config.load(config)
    return Runtime(model, config, device=device)


def _as_batch_one(input_ids: torch.Tensor | Sequence[int], *, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(np.asarray(input_ids))
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        batch = input_ids.shape[0] if input_ids.dim() else 0
        raise ValueError(f"hkv serves batch size 1, got input_ids of shape {tuple(input_ids.shape)} (batch size {batch})")
    if input_ids.shape[1] == 0 and not allow_empty:
        raise ValueError("input_ids is empty")
    return input_ids

