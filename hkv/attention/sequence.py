"""The KV cache of one sequence (batch 1) over all layers, backed by the tier manager.

Per layer, tokens live in three places:

* **sealed blocks** (``block_tokens`` tokens each, ``[2, Hkv, block_tokens, D]``) in the
  :class:`~hkv.tiers.manager.TierManager`; the first ``sink_tokens`` and the newest
  ``local_tokens`` worth of blocks are pinned on the device (they count against its budget);
* **block summaries** (min/max keys, :class:`~hkv.attention.selection.BlockSummaries`) on the
  device, outside the tier budget;
* the **fresh window**: the KV of the last :meth:`SequenceKV.append` plus the unsealed tail
  before it, from the last block boundary up to the newest token, on the device in the storage
  dtype, outside the tier budget (it is at most one append's tokens plus ``block_tokens - 1``;
  these are the activations the model just produced).

:meth:`SequenceKV.attend` for queries of the ``S`` newest tokens: each query chunk
(``attention.prefill_chunk_tokens``) reads the selected past blocks (all in exact mode; sink +
top-k + local in sparse mode, where the local window is the ``local_tokens // block_tokens``
blocks ending at the chunk's first query, so a decode step reads at most ``budget_tokens`` plus
the unsealed tail, i.e. fewer than ``budget_tokens + block_tokens`` tokens), gathered from the manager in pieces of a size fixed by memory and
in waves of at most ``gather_capacity()`` blocks, then the fresh window with a causal mask, all
merged with log-sum-exp (:class:`~hkv.attention.accumulator.AttentionAccumulator`). Piece boundaries
never depend on the manager's state, so output is bitwise identical with prefetch on or off.

A decode step over a layer whose sealed blocks are all on the device takes a shorter road with
the same result: the selection stays on the device, the blocks' slots come from the layer's
device-side table (:mod:`~hkv.attention.block_table`) and the pool is read by them, with no host
list of the blocks and no device -> host copy (:meth:`SequenceKV._attend_resident`).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import fields

import numpy as np
import torch

from ..blocks import DTYPE_NAMES, ROOT_CHAIN, BlockKey, chain_hash
from ..config import Config, ConfigError
from ..positions import RotaryShift, far_block_deltas
from ..prefetch.prefetcher import Prefetcher, PrefetchTicket
from ..store.summary_rows import SummaryRows
from ..tiers.manager import GatherReport, TierManager
from .accumulator import PIECE_KV_ELEMENTS, PIECE_SCORE_ELEMENTS, AttentionAccumulator, attend_one_piece, causal_mask
from .block_table import BlockRotations, BlockTables
from .decode_graphs import DecodeGraphs
from .selection import (BlockSummaries, SelectionEvent, SelectionObserver, block_scores, canonical_queries, observed_selection,
                        select_blocks)
from .stats import COUNTERS, SequenceStats, StepStats


class SequenceKV:
    """KV of one sequence over ``num_layers`` layers; see the module docstring for where it lives.

    Device memory: the pinned sink / local blocks count against ``tiers.device``; the block
    summaries, the fresh window (unsealed tail included) and the transient pieces gathered for
    one attention call do not (they are small and bounded: ``PIECE_*_ELEMENTS``).

    ``dtype``: the model's KV dtype; the storage dtype is ``config.tiers.dtype`` ("auto" =
    ``dtype``) and must match the manager's layout. ``fingerprint``: the model's identity,
    part of every block key. ``prefetcher``: a shared :class:`~hkv.prefetch.prefetcher.Prefetcher`
    or None (not closed here). ``persist``: write every sealed block (and its summary) through
    to the disk store whatever ``store.persist`` says (a session's sequence). ``on_selection``:
    a :data:`~hkv.attention.selection.SelectionObserver` called with every block selection
    :meth:`attend` makes (it may return a selection to read instead); None: no call.
    ``predicted_ahead``: next-layer hooks (:mod:`hkv.integrations.next_layer`) call
    :meth:`prefetch_ahead` for layers ``1 ..`` at decode steps, so :meth:`attend` predicts the
    next step's blocks for layer 0 only.
    """

    def __init__(self, manager: TierManager, config: Config, *, num_layers: int, num_kv_heads: int, num_q_heads: int,
                 head_dim: int, dtype: torch.dtype, fingerprint: bytes, prefetcher: Prefetcher | None = None,
                 persist: bool = False, rotary: RotaryShift | None = None, on_selection: SelectionObserver | None = None,
                 predicted_ahead: bool = False) -> None:
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads = {num_q_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
        a = config.attention
        self.manager, self.config, self.prefetcher = manager, config, prefetcher
        self.persist = persist  # sealed blocks written through to disk with their summaries (sessions)
        self.on_selection = on_selection  # diagnosis hook: sees (and may replace) every selection
        # layers 1.. get their decode predictions from prefetch_ahead (next-layer hooks): the same-layer
        # prediction of the previous step would only be replaced, its reads wasted
        self.predicted_ahead = predicted_ahead
        self.num_layers, self.kv_heads, self.q_heads, self.head_dim = num_layers, num_kv_heads, num_q_heads, head_dim
        self.fingerprint = fingerprint
        self.dtype = dtype if config.tiers.dtype == "auto" else DTYPE_NAMES[config.tiers.dtype]
        self.device = torch.device(manager.device)
        self.block_tokens = a.block_tokens
        self.sink_blocks = a.sink_tokens // a.block_tokens
        self.local_blocks = a.local_tokens // a.block_tokens
        self.topk = None if a.mode == "exact" else (a.budget_tokens - a.sink_tokens - a.local_tokens) // a.block_tokens
        self.chunk = a.prefill_chunk_tokens
        self.margin = config.prefetch.margin
        self.score_policy = config.tiers.policy == "score"
        # attention.positions = "remap": a hkv.positions.RotaryShift re-rotates the selected far blocks
        self.rotary = rotary if a.positions == "remap" else None
        if a.positions == "remap" and rotary is None:
            raise ValueError('attention.positions = "remap" needs rotary= (hkv.positions.RotaryShift.of(model))')
        layout = manager.layout
        if (layout.kv_heads, layout.block_tokens, layout.head_dim, layout.dtype) != (num_kv_heads, a.block_tokens, head_dim, self.dtype):
            raise ValueError(
                f"the manager's block layout ({layout.describe()}) does not match this sequence: {num_kv_heads} kv heads x "
                f"{a.block_tokens} tokens x {head_dim} dims x {self.dtype} (tiers.dtype = {config.tiers.dtype!r})"
            )
        block_bytes = layout.nbytes
        capacity = manager.stats().tiers["device"].capacity_bytes
        pinned = num_layers * (self.sink_blocks + self.local_blocks)
        if (pinned + 1) * block_bytes > capacity:
            raise ConfigError(
                f"tiers.device = {capacity} bytes cannot hold the pinned sink + local blocks of {num_layers} layers "
                f"({pinned} blocks of {block_bytes} bytes) plus one block; raise tiers.device or lower "
                f"attention.sink_tokens / attention.local_tokens"
            )
        # remap scores blocks in the relative frame, as if each lay just before the local window
        self.summaries = BlockSummaries(num_layers, num_kv_heads, head_dim, self.device, rotary=self.rotary)
        self.score_distance = (self.local_blocks + 1) * self.block_tokens
        self._tokens = [0] * num_layers
        self._keys: list[list[BlockKey]] = [[] for _ in range(num_layers)]
        self._pinned: list[set[int]] = [set() for _ in range(num_layers)]
        self._fresh: list[tuple[torch.Tensor, torch.Tensor, int] | None] = [None] * num_layers
        # Per layer a preallocated window [2, Hkv, block_tokens, D] for decode appends; _fresh_kv[layer]
        # is the fresh window as its view [2, Hkv, F, D] when the fresh window lives there (else None)
        self._windows: list[torch.Tensor | None] = [None] * num_layers
        self._fresh_kv: list[torch.Tensor | None] = [None] * num_layers
        self._ids = np.empty(1024, dtype="<i8")  # token ids noted so far
        self._noted = 0
        self._chains: list[bytes] = []
        self._nonce: bytes | None = None  # set when blocks seal before any note_tokens: random chain
        if on_selection is not None:  # an observer may force other blocks: this KV is never shared or adopted
            self._nonce = os.urandom(16)
        self._tickets: list[PrefetchTicket | None] = [None] * num_layers
        # decode steps over layers whose blocks are all on the device select and read on the device
        # (block_table.py); the score policy (which needs the scores on the host) reads through the host lists
        self._tables = BlockTables(manager, num_layers, self.device)
        self._rotations = BlockRotations(self.rotary, self.block_tokens, self.device) if self.rotary is not None else None
        self._table_reads = not self.score_policy
        # On a GPU (fp16 / bf16 storage) a decode step reads the whole fresh window, its unwritten
        # end masked: shapes then change only at block boundaries, the read is one fused kernel,
        # and a resident layer's attention replays a CUDA graph (decode_graphs.py)
        self._padded = self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        self._graphs = DecodeGraphs(num_layers, self.device) if self._padded and a.cuda_graphs else None
        self._tail_rows: torch.Tensor | None = None  # [bt + 1, bt]: row f is 0 for the first f entries, -inf after
        self._mask_zeros = torch.zeros(0, dtype=self.dtype, device=self.device)
        self._summary_writes: list[tuple[int, int, int, Future]] = []  # (layer, first block, blocks, put_summaries' future)
        self._unsummarised: set[tuple[int, int]] = set()  # (layer, block) whose summary write found no block
        self._share = 0  # prefetch blocks per layer this step
        self._step: StepStats | None = None
        self._moved_start: dict[str, int] = {}
        self._totals = SequenceStats()
        self.history: deque[StepStats] = deque(maxlen=1024)
        self._closed = False

    # -- token identity --------------------------------------------------------------------------

    def note_tokens(self, token_ids: torch.Tensor) -> None:
        """Record the 1-D ids of the tokens the next forward appends (block keys hash them)."""
        ids = token_ids.detach().reshape(-1).cpu().numpy().astype("<i8", copy=False)
        if self._nonce is not None:
            return  # keys already follow the random chain; stay consistent
        need = self._noted + len(ids)
        if need > len(self._ids):
            grown = np.empty(max(need, 2 * len(self._ids)), dtype="<i8")
            grown[: self._noted] = self._ids[: self._noted]
            self._ids = grown
        self._ids[self._noted : need] = ids
        self._noted = need

    def _chain(self, block: int) -> bytes:
        bt = self.block_tokens
        while len(self._chains) <= block:
            i = len(self._chains)
            previous = self._chains[-1] if self._chains else None
            if self._noted == 0 and self._nonce is None:
                self._nonce = os.urandom(16)
            if self._nonce is not None:
                self._chains.append(chain_hash(previous or self._nonce, [i]))
            elif self._noted >= (i + 1) * bt:
                self._chains.append(chain_hash(previous or bytes(16), self._ids[i * bt : (i + 1) * bt]))
            else:
                raise ValueError(
                    f"block {i} seals tokens up to {(i + 1) * bt} but note_tokens covered only {self._noted} tokens; "
                    "call note_tokens(ids) before appending their KV"
                )
        return self._chains[block]

    # -- append ----------------------------------------------------------------------------------

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``keys``, ``values`` ``[Hkv, S, D]`` (post-RoPE) of ``S`` new tokens to ``layer``.

        Full blocks are sealed into the manager (sink / local blocks pinned), summarised and
        retained; the rest stays in the fresh window."""
        self._check_open()
        started = time.perf_counter()
        if keys.dim() != 3 or keys.shape != values.shape or keys.shape[0] != self.kv_heads or keys.shape[2] != self.head_dim:
            raise ValueError(f"append expects keys and values [{self.kv_heads}, S, {self.head_dim}], got {tuple(keys.shape)} and {tuple(values.shape)}")
        bt = self.block_tokens
        before = self._tokens[layer]
        if (before + keys.shape[1]) // bt > before // bt:
            self._chain((before + keys.shape[1]) // bt - 1)  # raises before anything changes
        aligned = before - before % bt
        after = before + keys.shape[1]
        kv = self._append_in_window(layer, keys, values, before, aligned, after)
        if kv is not None:
            k, v = kv[0], kv[1]
        else:
            k = keys.to(self.device, self.dtype)
            v = values.to(self.device, self.dtype)
            fresh = self._fresh[layer]
            if fresh is not None and before > aligned:  # prepend the unsealed tail
                fk, fv, start = fresh
                k = torch.cat([fk[:, aligned - start :], k], dim=1)
                v = torch.cat([fv[:, aligned - start :], v], dim=1)
        self._fresh[layer] = (k, v, aligned)
        self._fresh_kv[layer] = kv
        self._tokens[layer] = after
        sealed_before, sealed_after = before // bt, after // bt
        if sealed_after > sealed_before:
            self._seal(layer, k, v, sealed_before, sealed_after)
        if self._step is not None:
            self._step.append_s += time.perf_counter() - started

    def _append_in_window(self, layer: int, keys: torch.Tensor, values: torch.Tensor, before: int, aligned: int,
                          after: int) -> torch.Tensor | None:  # fmt: skip
        """Write the new tokens into the layer's window (a decode step's append: no allocation and
        no concatenation); returns the fresh window ``[2, Hkv, after - aligned, D]`` as a view of
        it, or None when it does not fit (a longer append: the caller concatenates instead).

        The window holds tokens ``aligned ..``: the unsealed tail is already in place when the
        previous fresh window lived there from the same block boundary, and is copied in once
        otherwise (the first decode step after a prefill). Views of the previous fresh window
        are overwritten: nothing keeps them (sealing copies its blocks out first)."""
        bt = self.block_tokens
        if after - aligned > bt:
            return None
        window = self._windows[layer]
        if window is None:  # zeros: a padded read (self._padded) masks the unwritten end, which must be finite
            window = self._windows[layer] = torch.zeros(2, self.kv_heads, bt, self.head_dim, dtype=self.dtype, device=self.device)
        tail = before - aligned
        fresh = self._fresh[layer]
        if tail and not (self._fresh_kv[layer] is not None and fresh[2] == aligned):
            fk, fv, start = fresh  # the tail lives elsewhere (a longer append's concatenation): copy it in
            window[0, :, :tail] = fk[:, aligned - start : before - start]
            window[1, :, :tail] = fv[:, aligned - start : before - start]
        window[0, :, tail : after - aligned] = keys  # copy_ casts and moves as .to(device, dtype) does
        window[1, :, tail : after - aligned] = values
        return window[:, :, : after - aligned]

    def _seal(self, layer: int, k: torch.Tensor, v: torch.Tensor, first: int, end: int) -> None:
        n, bt = end - first, self.block_tokens
        shape = (self.kv_heads, n, bt, self.head_dim)
        blocks = torch.stack([k[:, : n * bt].reshape(shape), v[:, : n * bt].reshape(shape)]).permute(2, 0, 1, 3, 4).contiguous()
        new_keys = [BlockKey.make(self.fingerprint, self._chain(i), layer) for i in range(first, end)]
        keys = self._keys[layer]
        pinned = set(range(min(self.sink_blocks, end))) | set(range(max(0, end - self.local_blocks), end))
        leaving = sorted(self._pinned[layer] - pinned)
        if leaving:
            self.manager.unpin([keys[i] for i in leaving])
            self._pinned[layer] -= set(leaving)
        pin = [i - first for i in range(first, end) if i in pinned]
        loose = [i - first for i in range(first, end) if i not in pinned]  # contiguous: between sink and local
        persist = {"persist": True} if self.persist else {}
        if loose:
            step = max(1, self.manager.gather_capacity())
            for s in range(0, len(loose), step):
                part = loose[s : s + step]
                self.manager.put_many([new_keys[i] for i in part], blocks[part[0] : part[-1] + 1], **persist)
        if pin:
            self.manager.put_many([new_keys[i] for i in pin], blocks[pin], pin=True, **persist)
        keys.extend(new_keys)
        self.manager.retain(new_keys)
        self._pinned[layer] = pinned
        self.summaries.add(layer, blocks[:, 0])
        if self.persist or self.manager.persist:  # stored blocks carry their summaries (sessions, prefix reuse)
            count = self.summaries.count(layer)
            future = SummaryRows(self.manager.store).submit_put(new_keys, self.summaries.export(layer, count - n, count),
                                                                relative=self.summaries.relative)  # fmt: skip
            self._summary_writes.append((layer, count - n, n, future))
            if len(self._summary_writes) >= 2 * self.num_layers:  # bounded without a commit (prefix reuse)
                self._collect_summary_writes(wait=False)

    def _collect_summary_writes(self, *, wait: bool) -> None:
        """Note the blocks whose write-through summary found no stored block, from the finished
        summary writes (all of them, waiting, with ``wait``); forget those writes."""
        pending = []
        for layer, first, n, future in self._summary_writes:
            if not wait and not future.done():
                pending.append((layer, first, n, future))
                continue
            try:
                skipped = future.result()
            except Exception:  # noqa: BLE001 -- the write failed: none of its summaries is stored
                skipped = range(n)
            self._unsummarised.update((layer, first + i) for i in skipped)
        self._summary_writes = pending

    def unsummarised_blocks(self) -> dict[int, list[int]]:
        """Per layer, the sealed blocks whose write-through summary was not stored (their block
        was not in the store yet when it was written, e.g. a put refused by a full disk and
        stored later), so that a session commit writes those and only those. Waits for the
        summary writes still queued; a block stays listed until :meth:`summaries_committed`."""
        self._collect_summary_writes(wait=True)
        out: dict[int, list[int]] = {}
        for layer, index in sorted(self._unsummarised):
            out.setdefault(layer, []).append(index)
        return out

    def summaries_committed(self, blocks: dict[int, list[int]]) -> None:
        """Forget ``blocks`` (as :meth:`unsummarised_blocks` returned them): a commit stored them."""
        self._unsummarised.difference_update((layer, i) for layer, indices in blocks.items() for i in indices)

    # -- sessions: adopting stored blocks, exporting what a commit needs ---------------------------

    def adopt(self, n_blocks: int, summaries: list[torch.Tensor] | list[list[torch.Tensor]],
              block_keys: list[list[BlockKey]] | None = None) -> None:  # fmt: skip
        """Take the next ``n_blocks`` complete blocks of the noted tokens as sealed blocks of every
        layer WITHOUT reading them: they are already stored (a restored session, a reused prefix).

        ``summaries[layer]``: ``[n_blocks, 2, Hkv, D]`` fp32 or fp16 (min, max of each block's keys),
        as stored; or a list of such pieces ``[n_i, 2, Hkv, D]`` in block order whose ``n_i`` add up
        to ``n_blocks`` (a session's summary runs, read without a concatenation). Every layer must
        be at the same block boundary (no unsealed tail) and :meth:`note_tokens` must cover the
        adopted tokens. The blocks are retained; the sink /
        local ones are pinned (read now, from wherever they are, every layer's in one call: one
        batch of disk reads; TierFullError pins none of them); the others stay where they are
        until attention or the prefetcher needs them. ``block_keys[layer]``: the blocks' keys, where the
        caller has them already (at least ``n_blocks`` per layer; else computed here)."""
        self._check_open()
        bt, first = self.block_tokens, len(self._keys[0])
        if any(t != first * bt for t in self._tokens) or any(len(k) != first for k in self._keys):
            raise ValueError(f"adopt needs every layer at the same block boundary; tokens per layer: {self._tokens}")
        pieces = [[s] if isinstance(s, torch.Tensor) else list(s) for s in summaries]
        if len(pieces) != self.num_layers or any(sum(len(p) for p in layer) != n_blocks
                                                 or any(tuple(p.shape[1:]) != (2, self.kv_heads, self.head_dim) for p in layer)
                                                 for layer in pieces):  # fmt: skip
            raise ValueError(f"adopt expects {self.num_layers} summaries of [{n_blocks}, 2, {self.kv_heads}, {self.head_dim}]")
        if n_blocks <= 0:
            return
        end = first + n_blocks
        self._chain(end - 1)  # raises (nothing changed) when note_tokens does not cover them
        to_pin: list[BlockKey] = []
        pinned_after: list[set[int]] = []
        for layer in range(self.num_layers):
            new_keys = (block_keys[layer][:n_blocks] if block_keys is not None
                        else [BlockKey.make(self.fingerprint, self._chain(i), layer) for i in range(first, end)])  # fmt: skip
            self.manager.retain(new_keys)
            keys = self._keys[layer]
            keys.extend(new_keys)
            self.summaries.extend(layer, pieces[layer])
            self._tokens[layer] = end * bt
            self._fresh[layer] = self._fresh_kv[layer] = None
            pinned = set(range(min(self.sink_blocks, end))) | set(range(max(0, end - self.local_blocks), end))
            leaving = sorted(self._pinned[layer] - pinned)
            if leaving:
                self.manager.unpin([keys[i] for i in leaving])
            self._pinned[layer] = self._pinned[layer] & pinned
            to_pin.extend(keys[i] for i in sorted(pinned - self._pinned[layer]))
            pinned_after.append(pinned)
        # Every layer's new pins in one call: one batch of disk reads (a resumed session's sink and
        # local blocks at 8K: 150 of SmolLM2's, 25.5 ms in 30 per-layer batches, 15 ms in one).
        if to_pin:
            self.manager.pin(to_pin)
        for layer, pinned in enumerate(pinned_after):
            self._pinned[layer] = pinned

    def prefix_chain(self) -> bytes | None:
        """Chain hash of the last sealed block (``ROOT_CHAIN`` before the first): the ``previous``
        from which the chain hashes of the next blocks follow (``hkv.blocks.chain_hashes``).
        None when they do not follow from the next noted tokens (keys on a random chain, or ids
        noted beyond the appended tokens), so that no stored block may be adopted."""
        n = self.sealed_blocks()
        if self._nonce is not None or self._noted != self.seq_length():
            return None
        return self._chain(n - 1) if n else ROOT_CHAIN

    def sealed_blocks(self) -> int:
        """Complete blocks per layer (the least advanced layer's count)."""
        return min(len(k) for k in self._keys) if self._keys else 0

    def tail_kv(self) -> torch.Tensor | None:
        """The unsealed tail of every layer: ``[layers, 2, Hkv, tail, D]`` (storage dtype, CPU),
        ``tail = seq_length() - sealed_blocks() * block_tokens``; None when there is none.
        Every layer must hold the same number of tokens (between forwards)."""
        total = self.seq_length()
        if any(t != total for t in self._tokens):
            raise ValueError(f"tail_kv: layers hold different token counts {self._tokens} (in the middle of a forward?)")
        start = (total // self.block_tokens) * self.block_tokens
        if total == start:
            return None
        out = torch.empty(self.num_layers, 2, self.kv_heads, total - start, self.head_dim, dtype=self.dtype)
        for layer in range(self.num_layers):
            fk, fv, f_start = self._fresh[layer]
            out[layer, 0] = fk[:, start - f_start :]
            out[layer, 1] = fv[:, start - f_start :]
        return out

    def block_summaries(self, layer: int, indices: list[int]) -> torch.Tensor:
        """Summaries of the layer's blocks ``indices``: ``[len(indices), 2, Hkv, D]`` fp32, CPU."""
        if not indices:
            return torch.empty(0, 2, self.kv_heads, self.head_dim)
        return torch.cat([self.summaries.export(layer, i, i + 1) for i in indices])

    # -- attention -------------------------------------------------------------------------------

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Causal attention of the ``S`` newest tokens' queries ``[Hq, S, D]`` (already
        appended) over the layer's KV; returns ``[Hq, S, D]`` in the query's dtype and device.
        ``scaling``: the logit scale (usually ``head_dim ** -0.5``). With ``attention.positions
        = "remap"`` the selected far blocks are read re-rotated to positions just before the local
        window (:meth:`_remap_deltas`, docs/positions.md); the stored keys never change."""
        self._check_open()
        started = time.perf_counter()
        q_heads, s, _ = query.shape
        if q_heads != self.q_heads:
            raise ValueError(f"attend expects {self.q_heads} query heads, got {q_heads}")
        if layer == 0:
            self._begin_step()
        step = self._step if self._step is not None else self._begin_step()
        total = self._tokens[layer]
        fresh = self._fresh[layer]
        q_start = total - s
        if fresh is None or q_start < fresh[2]:
            raise ValueError(f"attend: the {s} queries of layer {layer} reach past the last append's tokens; append their KV first")
        fk, fv, f_start = fresh
        past = f_start // self.block_tokens
        out_device = query.device
        if out_device != self.device:
            query = query.to(self.device)
        summary = self.summaries.summary(layer)
        if s == 1 and past and self._table_reads and self.on_selection is None:
            local = max(0, self.local_blocks - (q_start + 1 - f_start) // self.block_tokens)
            out = self._attend_resident(layer, query, summary, past, local, scaling, step)
            if out is not None:
                step.attend_s += time.perf_counter() - started
                return out if out_device == self.device else out.to(out_device)
        relative = self.summaries.relative and self.topk is not None  # exact mode scores nothing
        outputs = []
        selection = None
        for c0 in range(0, s, self.chunk):
            q = query if s <= self.chunk else query[:, c0 : c0 + self.chunk]
            q_pos = q_start + c0
            # the local window ends at the query: sealed fresh blocks before it count towards it
            local = max(0, self.local_blocks - (q_pos + 1 - f_start) // self.block_tokens)
            choosing = time.perf_counter()
            scoring = canonical_queries(q, q_pos, self.score_distance, self.rotary) if relative else q
            selection = select_blocks(scoring, summary, past_blocks=past, sink_blocks=self.sink_blocks, local_blocks=local,
                                      topk=self.topk, margin=self.margin, scaling=scaling)
            step.select_s += time.perf_counter() - choosing
            step.kernel_s += selection.kernel_s
            if self.on_selection is not None:
                selection = observed_selection(self.on_selection, SelectionEvent(layer, q_pos, q.shape[1], past, selection))
            acc = AttentionAccumulator(q, scaling, self.kv_heads)
            blocks = selection.indices()
            visible = q_pos + q.shape[1] - f_start
            if s == 1:  # a decode step: the fresh window joins the blocks' last piece (no mask: all visible)
                fresh_kv = self._fresh_kv[layer]
                deltas = self._remap_deltas(blocks, past, local)
                if self._pads(query, fresh_kv):  # the whole window, its unwritten end masked
                    self._read_blocks(layer, acc, blocks, 1, step, deltas, self._windows[layer], fresh_kv.shape[2])
                else:
                    self._read_blocks(layer, acc, blocks, 1, step, deltas, torch.stack([fk, fv]) if fresh_kv is None else fresh_kv)
            else:
                self._read_blocks(layer, acc, blocks, q.shape[1], step, self._remap_deltas(blocks, past, local))
                self._add_keys(acc, fk[:, :visible], fv[:, :visible], f_start, q_pos, q.shape[1])
            outputs.append(acc.result())
            step.kernel_s += acc.kernel_s
        if selection is not None and self.score_policy and selection.scored_indices():
            keys = self._keys[layer]
            self.manager.note_scores([keys[i] for i in selection.scored_indices()], selection.scores)
        if self.prefetcher is not None and selection is not None and not (self.predicted_ahead and layer > 0 and s == 1):
            self._prefetch(layer, selection.prediction())
        step.attend_s += time.perf_counter() - started
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out if out_device == self.device else out.to(out_device)

    def _attend_resident(self, layer: int, query: torch.Tensor, summary: torch.Tensor, past: int, local: int,
                         scaling: float, step: StepStats) -> torch.Tensor | None:  # fmt: skip
        """A decode step's attention (``query`` ``[Hq, 1, D]``) over a layer whose ``past`` sealed
        blocks are all on the device (without a GPU: all in RAM), through its device-side block
        table: the blocks :func:`~hkv.attention.selection.select_blocks` would choose, chosen on
        the device (the same scores, the same ``topk`` call, so the same blocks in the same
        order), their rows looked up in the table and read from the pool in the pieces
        :meth:`_read_blocks` cuts, then the same accumulator calls: bitwise the result of the
        host path, with no device -> host transfer. None (nothing done) when the layer has blocks
        away, or one left its slot meanwhile: the caller reads through the host path. On a GPU a
        read of one piece is one function of the device's tensors, replayed from a CUDA graph
        (:meth:`_resident_one_piece`)."""
        low = min(self.sink_blocks, past)
        high = max(low, past - local)
        candidates = high - low
        scored = self.topk is not None and candidates > self.topk
        if scored and self._rotations is not None and low == 0:
            return None  # remap without sink blocks may move nothing, which only the host list tells
        found = self._tables.lookup(layer, self._keys[layer], past, self._totals.step)
        if found is None:
            return None
        epoch, table = found
        acc = AttentionAccumulator(query, scaling, self.kv_heads)
        per_piece = self._blocks_per_piece(acc, 1)
        k = min(self.topk, candidates) if scored else None  # None: every block, nothing scored
        n = low + k + past - high if k is not None else past
        fresh = self._fresh_kv[layer]
        report = GatherReport()
        if self._pads(query, fresh) and n <= per_piece:
            result = self._resident_one_piece(layer, acc, summary, epoch, table, past, low, high, k, fresh.shape[2], report)
            if result is None:
                return None
        else:
            result = self._resident_pieces(layer, acc, summary, epoch, table, past, low, high, k, per_piece, report, step)
            if result is None:
                return None
        self._take_prediction(layer, step)  # used up, as a host read would
        pinned = low + past - high
        step.read += n
        step.pinned += pinned
        step.needed += n - pinned
        step.unpredicted += n - pinned  # readable in place all along: nothing was predicted or moved for them
        step.resident += report.resident
        step.table_reads += 1
        step.kernel_s += report.copy_s + acc.kernel_s
        return result

    def _device_selection(self, query: torch.Tensor, q_pos: int, summary: torch.Tensor, table: torch.Tensor, past: int,
                          low: int, high: int, k: int | None, scaling: float, kernel_s: list[float] | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """The rows of the blocks a decode step reads (sink, the top ``k`` of blocks ``low .. high``
        by score, local; ``k`` None: every block, nothing scored), from the layer's ``table``, with
        no host transfer; and with positions = "remap" the cos and sin ``[n, R]`` of each block's
        move (None, None otherwise, or when nothing is scored). ``q_pos``: the query's position."""
        if k is None:
            return table, None, None
        scoring = (canonical_queries(query, q_pos, self.score_distance, self.rotary, non_blocking=True)
                   if self._rotations is not None else query)  # fmt: skip
        scores = block_scores(scoring, summary[..., low:high], scaling=scaling, timing=kernel_s)
        want = min(high - low, self.topk + math.ceil(self.margin * self.topk))
        chosen = torch.topk(scores, want, sorted=True)[1][:k].sort().values.add_(low)
        positions = self._tables.positions(past)
        blocks = torch.cat([positions[:low], chosen, positions[high:past]])
        if self._rotations is None:
            return table[blocks], None, None
        n = low + k + past - high
        moves = positions[:n] - blocks  # far blocks to the slots just before the local window (_remap_deltas)
        moves += high - (low + k)  # local blocks: 0; the j-th far block: high - (far count) + j - block
        all_cos, all_sin = self._rotations.rows(past + 1)
        return table[blocks], all_cos[moves], all_sin[moves]

    def _resident_pieces(self, layer: int, acc: AttentionAccumulator, summary: torch.Tensor, epoch: int, table: torch.Tensor,
                         past: int, low: int, high: int, k: int | None, per_piece: int, report: GatherReport,
                         step: StepStats) -> torch.Tensor | None:  # fmt: skip
        """:meth:`_attend_resident` in the pieces :meth:`_read_blocks` cuts (eager)."""
        choosing = time.perf_counter()
        kernel_s = [0.0]
        slots, cos, sin = self._device_selection(acc.query, self._tokens[layer] - 1, summary, table, past, low, high, k,
                                                 acc.scaling, kernel_s)  # fmt: skip
        n = slots.shape[0]
        step.select_s += time.perf_counter() - choosing
        step.kernel_s += kernel_s[0]
        fresh = self._fresh_kv[layer]
        valid = None
        if self._pads(acc.query, fresh):
            fresh, valid = self._windows[layer], fresh.shape[2]
        elif fresh is None:
            fk, fv, _ = self._fresh[layer]
            fresh = torch.stack([fk, fv])
        bt, d, h = self.block_tokens, self.head_dim, self.kv_heads
        spans = [(p0, min(per_piece, n - p0)) for p0 in range(0, n, per_piece)]  # (first block, blocks) per piece
        pieces = [torch.empty(2, h, m * bt + (fresh.shape[2] if p0 + m == n else 0), d, dtype=self.dtype, device=self.device)
                  for p0, m in spans]  # fmt: skip
        reads = [(slots[p0 : p0 + m], piece[:, :, : m * bt].view(2, h, m, bt, d)) for (p0, m), piece in zip(spans, pieces)]
        if not self.manager.read_table_rows(epoch, reads, report=report):
            return None
        for (p0, m), piece in zip(spans, pieces):
            if cos is not None:
                piece[0, :, : m * bt] = self.rotary.rotate_blocks_by(piece[0, :, : m * bt], cos[p0 : p0 + m], sin[p0 : p0 + m], bt)
            if p0 + m == n:
                piece[:, :, m * bt :] = fresh
                self._add_last(acc, piece, valid, single=p0 == 0)
            else:
                acc.add_kv(piece)
        return acc.result()

    def _resident_one_piece(self, layer: int, acc: AttentionAccumulator, summary: torch.Tensor, epoch: int,
                            table: torch.Tensor, past: int, low: int, high: int, k: int | None, valid: int,
                            report: GatherReport) -> torch.Tensor | None:  # fmt: skip
        """:meth:`_attend_resident` when its read is one piece and the fresh window is read whole
        (on a GPU): selection, lookup, gather and attention as one function of the device's
        tensors, run under the manager's lock (the rows must stay put until the reads are queued);
        replayed from the layer's CUDA graph, captured whenever the read's geometry changes
        (:class:`~hkv.attention.decode_graphs.DecodeGraphs`), eager where graphs are off. Bitwise
        :meth:`_read_blocks`' result either way (the same calls)."""
        bt, d, h = self.block_tokens, self.head_dim, self.kv_heads
        n = low + k + past - high if k is not None else past
        keys = (n + 1) * bt
        window = self._windows[layer]
        scaling, q_pos = acc.scaling, self._tokens[layer] - 1
        self._tables.positions(past)  # grown here, not inside a capture
        if self._rotations is not None:
            self._rotations.rows(past + 1)
        graphs = self._graphs if self._rotations is None else None  # remap's query rotation depends on the step
        output: list[torch.Tensor] = []

        def read(source: torch.Tensor) -> None:
            def build(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                slots, cos, sin = self._device_selection(q, q_pos, summary, table, past, low, high, k, scaling)
                piece = torch.empty(2, h, keys, d, dtype=self.dtype, device=self.device)
                torch.index_select(source, 2, slots, out=piece[:, :, : n * bt].view(2, h, n, bt, d))
                if cos is not None:
                    piece[0, :, : n * bt] = self.rotary.rotate_blocks_by(piece[0, :, : n * bt], cos, sin, bt)
                piece[:, :, n * bt :] = window
                return attend_one_piece(q, piece, mask, scaling, h)

            out = None
            if graphs is not None:
                key = (past, low, high, k, summary.data_ptr(), table.data_ptr(), window.data_ptr(), source.data_ptr(),
                       acc.query.shape, acc.query.stride(), scaling)  # fmt: skip
                out = graphs.run(layer, key, build, acc.query, self._tail_row(valid), keys)
            output.append(out if out is not None else build(acc.query, self._window_mask(keys, valid)))

        if not self.manager.run_table_read(epoch, read, n, report=report):
            return None
        return output[0]

    def _add_keys(self, acc: AttentionAccumulator, k: torch.Tensor, v: torch.Tensor, k_start: int, q_pos: int, nq: int) -> None:
        """Feed keys at positions ``k_start ...`` to ``acc`` in memory-bounded pieces, causally masked."""
        step = max(1, PIECE_SCORE_ELEMENTS // (self.q_heads * nq)) if acc.materializes_scores else max(1, k.shape[1])
        for p0 in range(0, k.shape[1], step):
            p1 = min(k.shape[1], p0 + step)
            acc.add(k[:, p0:p1], v[:, p0:p1], causal_mask(q_pos, nq, k_start + p0, p1 - p0, self.device))

    def _remap_deltas(self, blocks: list[int], past: int, local: int) -> list[int] | None:
        """With positions = "remap": per selected block, the positions (in blocks) it moves by.

        The far blocks (sink + top-k: those below the local window's first block) go, in their
        order, to contiguous slots ending just before the local window; the local window and the
        fresh window keep their positions. None when nothing moves (positions = "original", or
        every far block already sits there), so that case reads exactly as "original" does."""
        if self.rotary is None:
            return None
        low = min(self.sink_blocks, past)
        boundary = max(low, past - local)  # the local window's first block (as in select_blocks)
        far = [i for i in blocks if i < boundary]
        deltas = far_block_deltas(far, boundary) + [0] * (len(blocks) - len(far))
        return deltas if any(deltas) else None

    def _blocks_per_piece(self, acc: AttentionAccumulator, nq: int) -> int:
        """Blocks read per attention piece for ``nq`` queries: fixed by the memory constants
        (``PIECE_*_ELEMENTS``) only, so both reads cut the same pieces whatever the residency."""
        per_piece = max(1, PIECE_KV_ELEMENTS // (2 * self.kv_heads * self.block_tokens * self.head_dim))
        if acc.materializes_scores:
            per_piece = max(1, min(per_piece, PIECE_SCORE_ELEMENTS // (self.q_heads * nq * self.block_tokens)))
        return per_piece

    def _read_blocks(self, layer: int, acc: AttentionAccumulator, indices: list[int], nq: int, step: StepStats,
                     deltas: list[int] | None = None, fresh: torch.Tensor | None = None, valid: int | None = None) -> None:
        """Gather the blocks ``indices`` (sorted) of ``layer`` and feed them to ``acc``; ``deltas``
        (positions = "remap"): per block, the blocks' worth of positions its keys move by.
        ``fresh``: keys and values ``[2, Hkv, F, D]`` that every query sees (a decode step's fresh
        window), read in the same piece as the last blocks (one copy behind them). ``valid``: the
        window is read whole (``F`` = ``block_tokens``) and only its first ``valid`` tokens are
        seen (:meth:`_add_last`).

        Each piece is one buffer ``[2, Hkv, tokens, D]``: the manager writes the blocks straight
        into it (:meth:`~hkv.tiers.promotion.Promotion.gather_into`: one ``index_select`` when
        they are all on the device), the fresh window is copied behind them, and the accumulator
        reads it in one attention call. Piece sizes depend on memory constants and the selection
        only, never on the manager's state, so results never depend on timing."""
        if not indices:
            if fresh is not None:
                self._add_last(acc, fresh, valid, single=True)
            return
        keys = self._keys[layer]
        wanted = [keys[i].digest for i in indices]
        predicted = self._take_prediction(layer, step)
        bt, d, h = self.block_tokens, self.head_dim, self.kv_heads
        per_piece = self._blocks_per_piece(acc, nq)
        report = GatherReport(late_keys=set())
        gather_into = self.manager.gather_into
        for p0 in range(0, len(wanted), per_piece):
            part = wanted[p0 : p0 + per_piece]
            n = len(part)
            extra = fresh.shape[2] if fresh is not None and p0 + n == len(wanted) else 0
            piece = torch.empty(2, h, n * bt + extra, d, dtype=self.dtype, device=self.device)
            gather_into(part, piece[:, :, : n * bt].view(2, h, n, bt, d), report=report)
            if deltas is not None:
                piece[0, :, : n * bt] = self.rotary.rotate_blocks(piece[0, :, : n * bt], [x * bt for x in deltas[p0 : p0 + n]], bt)
            if extra:
                piece[:, :, n * bt :] = fresh
                self._add_last(acc, piece, valid, single=p0 == 0)
            else:
                acc.add_kv(piece)
        step.kernel_s += report.copy_s
        self._count_prefetch(layer, wanted, indices, predicted, report, step)

    def _pads(self, query: torch.Tensor, fresh_kv: torch.Tensor | None) -> bool:
        """Whether a decode step reads the whole fresh window with its unwritten end masked
        (``self._padded``: on a GPU), for this query and fresh window (one in the layer's window)."""
        return self._padded and fresh_kv is not None and query.dtype == self.dtype

    def _add_last(self, acc: AttentionAccumulator, piece: torch.Tensor, valid: int | None, *, single: bool) -> None:
        """Feed a decode step's last piece ``[2, Hkv, N, D]``, which ends with the fresh window, to
        ``acc``: as it is when ``valid`` is None; else the window is the whole of it (``block_tokens``
        tokens) and its tokens from ``valid`` on are masked: one fused kernel when the piece is the
        read's only one (``single``, :func:`~hkv.attention.accumulator.attend_one_piece`), the
        accumulator's masked merge otherwise."""
        if valid is None:
            acc.add_kv(piece)
            return
        mask = self._window_mask(piece.shape[2], valid)
        if single:
            acc.set_output(attend_one_piece(acc.query, piece, mask, acc.scaling, self.kv_heads))
        else:
            acc.add(piece[0], piece[1], mask.view(1, -1) == 0)

    def _tail_row(self, valid: int) -> torch.Tensor:
        """``[block_tokens]`` additive mask of a fresh window whose first ``valid`` tokens are written:
        0 there, -inf after (a view of one cached table)."""
        if self._tail_rows is None:
            bt = self.block_tokens
            cols = torch.arange(bt, device=self.device).unsqueeze(0)
            rows = torch.arange(bt + 1, device=self.device).unsqueeze(1)
            self._tail_rows = torch.zeros(bt + 1, bt, dtype=self.dtype, device=self.device).masked_fill_(cols >= rows, float("-inf"))
        return self._tail_rows[valid]

    def _window_mask(self, keys: int, valid: int) -> torch.Tensor:
        """``[1, 1, 1, keys]`` additive mask of a piece that ends with the whole fresh window:
        0 but for the window's tokens from ``valid`` on (-inf)."""
        before = keys - self.block_tokens
        if self._mask_zeros.numel() < before:
            self._mask_zeros = torch.zeros(max(before, 2 * self._mask_zeros.numel()), dtype=self.dtype, device=self.device)
        return torch.cat([self._mask_zeros[:before], self._tail_row(valid)]).view(1, 1, 1, keys)

    # -- prefetch --------------------------------------------------------------------------------

    def _take_prediction(self, layer: int, step: StepStats) -> set[bytes] | None:
        """The digests of the blocks this step's prefetch predicted for the layer's next read
        (None when it predicted nothing); the prediction is used up by that read."""
        ticket = self._tickets[layer]
        if ticket is None:
            return None
        self._tickets[layer] = None
        step.predicted += len(ticket.keys)
        return {key.digest for key in ticket.keys}

    def _count_prefetch(self, layer: int, wanted: list[bytes], indices: list[int], predicted: set[bytes] | None,
                        report: GatherReport, step: StepStats) -> None:
        """Count every block of one read (``wanted``: digests, distinct, gathered with ``report``) in one
        bucket of :class:`~hkv.attention.stats.StepStats`: pinned, hit, unpredicted, waited or
        fetched (the gather found the last two not on the device: ``report.late_keys``)."""
        pinned, late = self._pinned[layer], report.late_keys
        n_pinned = hit = unpredicted = pinned_read = 0  # one pass: pinned_read counts late pinned blocks too
        for key, i in zip(wanted, indices):
            if i in pinned:
                pinned_read += 1
                if not (late and key in late):  # else waited for or fetched: counted by the report
                    n_pinned += 1
            elif late and key in late:
                continue
            elif predicted is not None and key in predicted:
                hit += 1
            else:
                unpredicted += 1
        step.read += len(wanted)
        step.pinned += n_pinned
        step.needed += len(indices) - pinned_read
        step.hit += hit
        step.unpredicted += unpredicted
        step.resident += report.resident
        step.waited += report.waited
        step.fetched += report.fetched
        step.late += report.waited
        step.missed += report.fetched
        step.stall_s += report.stall_s

    def prefetch_ahead(self, layer: int, query: torch.Tensor, rotary: RotaryShift) -> None:
        """Prefetch the blocks that ``layer``'s next decode query is likely to read, from an
        estimate of that query (:mod:`hkv.integrations.next_layer`): ``query`` ``[Hq, D]``
        before RoPE, for the token the layer appends next; ``rotary``: the model's rotation.

        Scores the layer's summaries as :meth:`attend` will (same frame, same budget, the
        blocks sealed so far) and replaces the layer's pending prediction with this one.
        Nothing else changes: :meth:`attend` chooses its blocks from the real query."""
        if self.prefetcher is None or self.topk is None or self._closed:
            return
        fresh = self._fresh[layer]
        if fresh is None:
            return
        q_pos, f_start, bt = self._tokens[layer], fresh[2], self.block_tokens
        past = f_start // bt
        if self._tables.current(layer, past):  # every block on the device: nothing to bring
            return
        local = max(0, self.local_blocks - (q_pos + 1 - f_start) // bt)
        # pre-RoPE -> the frame attend scores in: at its own position, or (remap) at score_distance
        turn = self.score_distance if self.summaries.relative else q_pos
        scoring = rotary.rotate(query.unsqueeze(1), torch.tensor([turn]))
        selection = select_blocks(scoring, self.summaries.summary(layer), past_blocks=past, sink_blocks=self.sink_blocks,
                                  local_blocks=local, topk=self.topk, margin=self.margin, scaling=self.head_dim**-0.5)  # fmt: skip
        self._prefetch(layer, selection.prediction())

    def _prefetch(self, layer: int, predicted: list[int]) -> None:
        self.prefetcher.cancel(self._tickets[layer])
        count = min(len(predicted), self._share)
        if count == 0:
            self._tickets[layer] = None
            return
        keys = self._keys[layer]
        self._tickets[layer] = self.prefetcher.submit(layer, [keys[i] for i in predicted[:count]], self.manager.prefetch_tier)

    # -- stats -----------------------------------------------------------------------------------

    def _begin_step(self) -> StepStats:
        moved = dict(self.manager.stats().moved_bytes)
        if self._step is not None:
            self._step.moved_bytes = {k: moved.get(k, 0) - self._moved_start.get(k, 0) for k in moved}
            self._finish_step(self._step)
        self._moved_start = moved
        # Each layer may prefetch its share of the blocks a gather can take (other layers' reads
        # would otherwise evict what was prefetched before it is used).
        self._share = max(0, self.manager.gather_capacity() // max(1, self.num_layers))
        self._step = StepStats(step=self._totals.step)
        return self._step

    def _finish_step(self, step: StepStats) -> None:
        totals = self._totals
        for name in COUNTERS:
            setattr(totals, name, getattr(totals, name) + getattr(step, name))
        for key, value in step.moved_bytes.items():
            totals.moved_bytes[key] = totals.moved_bytes.get(key, 0) + value
        totals.step += 1
        self.history.append(step)

    def step_stats(self) -> StepStats:
        """A copy of the current step's figures (bytes moved so far in it, by every user of the manager)."""
        step = self._step if self._step is not None else StepStats()
        copy = StepStats(**{f.name: getattr(step, f.name) for f in fields(StepStats)})
        if self._step is not None and not self._closed:
            moved = self.manager.stats().moved_bytes
            copy.moved_bytes = {k: v - self._moved_start.get(k, 0) for k, v in moved.items()}
        return copy

    @property
    def graphs(self) -> DecodeGraphs | None:
        """The CUDA graphs of the resident decode reads (their counts, and why they were turned
        off if they were); None without a GPU or with ``attention.cuda_graphs = false``."""
        return self._graphs

    def stats(self) -> SequenceStats:
        """Totals over every step so far, the current step included."""
        out = SequenceStats(**{f.name: getattr(self._totals, f.name) for f in fields(StepStats)})
        out.moved_bytes = dict(self._totals.moved_bytes)
        if self._step is not None:
            current = self.step_stats()
            for name in COUNTERS:
                setattr(out, name, getattr(out, name) + getattr(current, name))
            out.step += 1
            out.last = current
        out.tokens = self.seq_length()
        out.blocks = sum(len(k) for k in self._keys)
        return out

    def block_keys(self, layer: int) -> list[BlockKey]:
        """Keys of the layer's sealed blocks, oldest first (a copy)."""
        return list(self._keys[layer])

    def seq_length(self) -> int:
        """Tokens appended so far (to the most advanced layer)."""
        return max(self._tokens) if self._tokens else 0

    # -- lifetime --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this SequenceKV is closed")

    def close(self) -> None:
        """Cancel this sequence's prefetches, unpin its blocks and release its references (the
        blocks stay in the tiers for reuse). Idempotent; closes neither manager nor prefetcher."""
        if self._closed:
            return
        self._closed = True
        for layer in range(self.num_layers):
            if self.prefetcher is not None:
                self.prefetcher.cancel(self._tickets[layer])
            self._tickets[layer] = None
            keys = self._keys[layer]
            if self._pinned[layer]:
                self.manager.unpin([keys[i] for i in sorted(self._pinned[layer])])
            if keys:
                self.manager.release(keys)
            self._pinned[layer] = set()
            self._fresh[layer] = self._fresh_kv[layer] = self._windows[layer] = None
        self._tables.forget()
        if self._graphs is not None:
            self._graphs.forget()
