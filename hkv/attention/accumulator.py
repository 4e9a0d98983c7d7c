"""Attention over KV that arrives in pieces, merged exactly with log-sum-exp.

Flash-decoding style: for queries ``[Hq, S, D]`` the accumulator keeps, per query head and
query, the running max logit ``m``, the running sum of ``exp(logit - m)`` and the running
``exp``-weighted sum of values, all in fp32. Each piece of keys/values (a wave of gathered
blocks, the local window, the unsealed tail) updates them; :meth:`AttentionAccumulator.result`
divides. The merge is exact (up to fp32 rounding), so reading the KV in any number of pieces
reproduces one softmax over all of it. Results depend only on the pieces and their order, never
on timing. On the CPU each piece runs PyTorch's fused flash-attention kernel (output and
log-sum-exp per row, no logits matrix), about 3x faster than the explicit path kept for other
devices; the merge is the same.

GQA: query head ``h`` reads KV head ``h // (Hq // Hkv)`` (transformers' ``repeat_kv``).

The per-sequence, per-layer driver that picks blocks, gathers them from the tiers and feeds
this accumulator is :class:`hkv.attention.sequence.SequenceKV`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PIECE_SCORE_ELEMENTS = 1 << 24  # fp32 logits built at once per piece (64 MiB); pieces are cut to fit
PIECE_KV_ELEMENTS = 1 << 24  # key + value elements gathered at once per piece (32 MiB in fp16)


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU flash attention, ``[B, H, L, D]`` in; (output, log-sum-exp ``[B, H, L]``) out."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, **kwargs)


def _batch_of_one(x: torch.Tensor) -> torch.Tensor:
    """``[H, N, D]`` as a contiguous fp32 ``[1, H, N, D]``; no op is dispatched when it is one
    already (a decode step's gathered piece): each costs microseconds of host time per layer."""
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x.unsqueeze(0) if x.is_contiguous() else x.contiguous().unsqueeze(0)


class AttentionAccumulator:
    """Softmax attention of fixed queries over KV given in pieces.

    ``query``: ``[Hq, S, D]``; ``scaling``: the logit scale (usually ``D ** -0.5``);
    ``kv_heads``: ``Hkv``, which must divide ``Hq``. ``fused``: use the fused CPU kernel
    (default: when the query is on the CPU; it exists only there).
    """

    def __init__(self, query: torch.Tensor, scaling: float, kv_heads: int, *, fused: bool | None = None) -> None:
        q_heads, s, d = query.shape
        if q_heads % kv_heads:
            raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
        self.shape = (q_heads, s, d)
        self.query, self.scaling = query, scaling  # as given (attend_one_piece reads them)
        self.dtype = query.dtype
        self.kv_heads = kv_heads
        self.group = q_heads // kv_heads
        self.rows = self.group * s
        self.device = query.device
        self.fused = query.device.type == "cpu" if fused is None else fused
        if self.fused and query.device.type != "cpu":
            raise ValueError("the fused attention kernel runs on the CPU only")
        self._q: torch.Tensor | None = None  # made at the first piece (attend_one_piece needs none)
        self._q4: torch.Tensor | None = None
        # The running state (max logit m, sum l, weighted values acc), made at the first merge.
        # A fused piece seen by every row is kept as is until a second piece arrives: with one
        # piece (a decode step's usual case) the result is the kernel's output, bitwise what the
        # merge would give (weight exp(0) = 1, sum 1), without the merge's operations.
        self.m: torch.Tensor | None = None
        self.l: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self._single: torch.Tensor | None = None  # the first fused piece's output [1, Hkv, g*S, D], unmerged
        self._single_lse: torch.Tensor | None = None
        # The explicit path's first unmasked piece is kept the same way: its softmax output, and
        # its logits [Hkv, g*S, N] whose log-sum-exp is taken only if a second piece comes (a
        # decode step's one piece then costs two matmuls and a softmax, not the merge's ~15 ops)
        self._single_logits: torch.Tensor | None = None
        self._output: torch.Tensor | None = None  # the whole result, computed in one call (set_output)
        self.kernel_s = 0.0  # seconds inside the attention kernels (the bytes read), for the step's host time

    def _scale_queries(self) -> None:
        """Make :attr:`q` and, for the fused kernel, its batch of one ``[1, Hkv, group * S, D]``
        (once, at the first piece, not per piece)."""
        if self._q is None:
            d = self.shape[2]
            scaled = self.query.to(torch.float32) * self.scaling
            self._q = scaled.reshape(self.kv_heads, self.rows, d)
            self._q4 = scaled.reshape(1, self.kv_heads, self.rows, d) if self.fused else None

    @property
    def q(self) -> torch.Tensor:
        """The scaled fp32 queries ``[Hkv, group * S, D]``, rows ordered (group member, query)."""
        self._scale_queries()
        return self._q

    def _state(self) -> None:
        """Make the running state: empty, or from the unmerged first piece."""
        if self.m is not None:
            return
        if self._single is not None:
            lse = self._single_lse[0] if self._single_logits is None else torch.logsumexp(self._single_logits, dim=2)
            self.m, self.l, self.acc = lse, torch.ones_like(lse), self._single[0]
            self._single = self._single_lse = self._single_logits = None
            return
        self.m = torch.full((self.kv_heads, self.rows), float("-inf"), device=self.device)
        self.l = torch.zeros(self.kv_heads, self.rows, device=self.device)
        self.acc = torch.zeros(self.kv_heads, self.rows, self.shape[2], device=self.device)

    @property
    def materializes_scores(self) -> bool:
        """Whether :meth:`add` builds the ``[Hq * S, N]`` logits (then callers cut pieces to
        ``PIECE_SCORE_ELEMENTS``); the CPU path runs a fused kernel that never does."""
        return not self.fused

    def add_kv(self, kv: torch.Tensor) -> None:
        """One piece that every query sees: ``kv`` ``[2, Hkv, N, D]`` (keys, values), as :meth:`add`
        without a mask. A contiguous fp32 ``kv`` (a decode step's buffer) reaches the fused
        kernel as two views of it, with no further op."""
        if self.fused and kv.dtype == torch.float32 and kv.is_contiguous() and kv.shape[2]:
            self._add_fused(kv[0:1], kv[1:2], None, batched=True)
            return
        if not self.fused and kv.dtype != torch.float32:  # one conversion for keys and values (one launch, not two)
            kv = kv.to(self.device, torch.float32)
        self.add(kv[0], kv[1])

    def add(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """One piece: ``keys``, ``values`` ``[Hkv, N, D]`` (any float dtype); ``mask`` ``[S, N]``
        bool, True where query ``s`` may read key ``n`` (None: all)."""
        n = keys.shape[1]
        if n == 0:
            return
        if not self.materializes_scores:
            self._add_fused(keys, values, mask)
            return
        started = time.perf_counter()
        if mask is None and self.m is None and self._single is None:
            logits = torch.bmm(self.q, keys.to(self.device, torch.float32).transpose(1, 2))  # [Hkv, g*S, N]
            out = torch.bmm(torch.softmax(logits, dim=2), values.to(self.device, torch.float32))
            self._single, self._single_logits = out.unsqueeze(0), logits
            self.kernel_s += time.perf_counter() - started
            return
        self._state()
        logits = torch.bmm(self.q, keys.to(self.device, torch.float32).transpose(1, 2))  # [Hkv, g*S, N]
        if mask is not None:
            keep = mask.to(self.device).repeat(self.group, 1)  # [g*S, N]
            logits.masked_fill_(~keep, float("-inf"))
        m_new = torch.maximum(self.m, logits.amax(dim=2))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing visible yet
        probs = torch.exp(logits.sub_(m_safe.unsqueeze(2)))
        correction = torch.exp(self.m - m_safe)
        self.l = self.l * correction + probs.sum(dim=2)
        self.acc = torch.baddbmm(self.acc * correction.unsqueeze(2), probs, values.to(self.device, torch.float32))
        self.m = m_new
        self.kernel_s += time.perf_counter() - started

    def _add_fused(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, *, batched: bool = False) -> None:
        """CPU: PyTorch's fused flash-attention kernel gives the piece's normalised output and
        per-row log-sum-exp ``lse``; merged as a piece with running max ``lse``, sum 1.
        ``batched``: ``keys`` and ``values`` are ``[1, Hkv, N, D]`` contiguous fp32 already."""
        k, v = (keys, values) if batched else (_batch_of_one(keys), _batch_of_one(values))
        additive = None
        hidden = None
        if mask is not None:
            keep = mask.repeat(self.group, 1)  # [g*S, N]
            additive = torch.zeros(keep.shape, dtype=torch.float32).masked_fill_(~keep, float("-inf"))
            hidden = ~keep.any(dim=1)  # rows that see no key of this piece (the kernel returns lse 0 there)
        started = time.perf_counter()
        self._scale_queries()
        out, lse = _flash_cpu(self._q4, k, v, attn_mask=additive, scale=1.0)  # [1, Hkv, g*S, D], [1, Hkv, g*S]
        self.kernel_s += time.perf_counter() - started
        if mask is None and self.m is None and self._single is None:
            self._single, self._single_lse = out, lse  # merged only if another piece comes
            return
        out, lse = out[0], lse[0]
        self._state()
        if hidden is not None and bool(hidden.any()):
            lse = lse.masked_fill(hidden.unsqueeze(0), float("-inf"))
        m_new = torch.maximum(self.m, lse)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        correction = torch.exp(self.m - m_safe)
        weight = torch.exp(lse - m_safe)
        self.l = self.l * correction + weight
        self.acc = self.acc * correction.unsqueeze(2) + out * weight.unsqueeze(2)
        self.m = m_new

    def set_output(self, out: torch.Tensor) -> None:
        """The whole attention's output ``[Hq, S, D]``, computed in one call over one piece
        (:func:`attend_one_piece`) instead of pieces fed to this accumulator; nothing else may
        have been or be added."""
        if self.m is not None or self._single is not None or self._output is not None:
            raise RuntimeError("set_output: pieces were added already")
        self._output = out

    def result(self) -> torch.Tensor:
        """``[Hq, S, D]`` in the query's dtype (rows that saw no key are zero)."""
        if self._output is not None:
            return self._output.to(self.dtype)
        if self._single is not None:
            return self._single.reshape(self.shape).to(self.dtype)
        self._state()
        out = self.acc / self.l.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(2)
        return out.reshape(self.shape).to(self.dtype)


def _efficient_backend(device: torch.device) -> Any:
    """On CUDA, sdpa's memory-efficient kernel (it takes an additive mask; flash does not, and the
    cuDNN backend plans each new shape anew at milliseconds of host time), the math one where it
    cannot run; elsewhere sdpa's choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def attend_one_piece(query: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scaling: float, kv_heads: int) -> torch.Tensor:
    """A decode step's attention read in one piece, as one fused kernel: ``query`` ``[Hq, 1, D]``
    over ``kv`` ``[2, Hkv, N, D]`` (keys, values; the query's dtype) with the additive ``mask``
    ``[1, 1, 1, N]`` (0 where read, -inf where not: the padded end of the fresh window);
    returns ``[Hq, 1, D]`` in the query's dtype. Softmax and sums are fp32 inside the kernel,
    whose inputs and output keep the storage dtype (as the model's own sdpa over its cache).
    The same shapes always run the same kernel, so a CUDA graph's replay of this call is
    bitwise its eager result (:mod:`~hkv.attention.decode_graphs`)."""
    q_heads, s, d = query.shape
    q = query.reshape(1, kv_heads, (q_heads // kv_heads) * s, d)
    with _efficient_backend(kv.device):
        out = F.scaled_dot_product_attention(q, kv[0:1], kv[1:2], attn_mask=mask, scale=scaling)
    return out.reshape(q_heads, s, d)


def causal_mask(query_start: int, queries: int, key_start: int, keys: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """``[queries, keys]`` bool: query at position ``query_start + i`` reads key at position
    ``key_start + j`` iff ``key_start + j <= query_start + i``; None when every key is visible."""
    if key_start + keys - 1 <= query_start:
        return None
    q_pos = torch.arange(query_start, query_start + queries, device=device).unsqueeze(1)
    k_pos = torch.arange(key_start, key_start + keys, device=device).unsqueeze(0)
    return k_pos <= q_pos


def attend_causal(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, *, chunk: int = 1024) -> torch.Tensor:
    """Reference-style causal attention of the ``S`` newest positions over ``N >= S`` keys,
    chunked over queries and keys (never an ``S x N`` matrix for long inputs).

    ``query`` ``[Hq, S, D]``, ``keys``/``values`` ``[Hkv, N, D]``; returns ``[Hq, S, D]``.
    """
    q_heads, s, _ = query.shape
    kv_heads, n, _ = keys.shape
    out = []
    for q0 in range(0, s, chunk):
        q = query[:, q0 : q0 + chunk]
        acc = AttentionAccumulator(q, scaling, kv_heads)
        q_pos = n - s + q0
        visible = q_pos + q.shape[1]
        step = max(1, PIECE_SCORE_ELEMENTS // (q_heads * q.shape[1]))
        for k0 in range(0, visible, step):
            k1 = min(visible, k0 + step)
            acc.add(keys[:, k0:k1], values[:, k0:k1], causal_mask(q_pos, q.shape[1], k0, k1 - k0, keys.device))
        out.append(acc.result())
    return torch.cat(out, dim=1)

