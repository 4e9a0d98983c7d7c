"""Attention by torch's sdpa (the reference hkv is checked against) and a SequenceKV over the
real TierManager fed with random KV (the attention, prefetch and positions tests)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import hkv.tiers.manager as tier_manager
from hkv.attention.sequence import SequenceKV
from hkv.blocks import BlockLayout
from hkv.config import Config

HQ, HKV, D, LAYERS = 4, 2, 8, 2


def reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """sdpa of ``query`` ``[Hq, S, D]`` over ``keys``/``values`` ``[Hkv, N, D]``; the S queries are the
    newest positions; ``mask`` ``[S, N]`` bool (None: causal)."""
    group = query.shape[0] // keys.shape[0]
    s, n = query.shape[1], keys.shape[1]
    if mask is None:
        mask = torch.arange(n).unsqueeze(0) <= torch.arange(n - s, n).unsqueeze(1)
    k = keys.repeat_interleave(group, dim=0)
    v = values.repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(query[None].float(), k[None].float(), v[None].float(), attn_mask=mask, scale=scaling)
    return out[0]


def make_config(tmp_path, *, mode: str = "exact", block: int = 4, sink: int = 4, local: int = 4, budget: int = 16,
                chunk: int = 8, device_blocks: int | None = None, host_blocks: int = 3, dtype: str = "auto", prefetch: bool = False) -> Config:
    block_bytes = 2 * HKV * block * D * 4
    if device_blocks is None:
        device_blocks = LAYERS * (sink + local) // block + 3
    return Config.load({
        "tiers": {"path": str(tmp_path / "store"), "device": device_blocks * block_bytes, "host": host_blocks * block_bytes,
                  "disk": "64MiB", "dtype": dtype},
        "attention": {"mode": mode, "block_tokens": block, "sink_tokens": sink, "local_tokens": local,
                      "budget_tokens": budget, "prefill_chunk_tokens": chunk},
        "prefetch": {"enabled": prefetch, "workers": 2},
    }, env={})


def open_sequence(config: Config, *, dtype: torch.dtype = torch.float32, prefetcher=None, manager=None, fingerprint: bytes = b"test-model",
                  device: str = "cpu", rotary=None):
    """``(manager, seq)``: a SequenceKV of ``LAYERS`` layers over ``manager`` (a new TierManager when None);
    ``rotary``: a RotaryShift, for ``attention.positions = "remap"``."""
    storage = dtype if config.tiers.dtype == "auto" else getattr(torch, config.tiers.dtype)
    if manager is None:
        manager = tier_manager.TierManager(config, BlockLayout(HKV, config.attention.block_tokens, D, storage), device=device)
    seq = SequenceKV(manager, config, num_layers=LAYERS, num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, dtype=dtype,
                     fingerprint=fingerprint, prefetcher=prefetcher, rotary=rotary)
    return manager, seq


@contextmanager
def opened_sequence(config: Config, **kwargs) -> Iterator[tuple[tier_manager.TierManager, SequenceKV]]:
    """:func:`open_sequence`, closing the sequence and then the manager on the way out."""
    manager, seq = open_sequence(config, **kwargs)
    try:
        yield manager, seq
    finally:
        seq.close()
        manager.close()


class Driver:
    """Feeds random KV and queries to a SequenceKV and keeps the full KV for the reference."""

    def __init__(self, seq: SequenceKV, manager, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        self.seq, self.manager, self.dtype = seq, manager, dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.keys = [torch.empty(HKV, 0, D) for _ in range(LAYERS)]
        self.values = [torch.empty(HKV, 0, D) for _ in range(LAYERS)]
        self.device_peak = 0

    def step(self, n: int, *, planted: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Append ``n`` tokens to every layer and attend; returns (hkv output, queries) per layer."""
        self.seq.note_tokens(torch.randint(0, 1000, (n,), generator=self.gen))
        results = []
        for layer in range(LAYERS):
            k = torch.randn(HKV, n, D, generator=self.gen)
            v = torch.randn(HKV, n, D, generator=self.gen)
            q = torch.randn(HQ, n, D, generator=self.gen)
            if planted is not None:
                k, q = planted["hook"](layer, self.keys[layer].shape[1], k, q)
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=1)
            self.values[layer] = torch.cat([self.values[layer], v], dim=1)
            self.seq.append(layer, k.to(self.dtype), v.to(self.dtype))
            out = self.seq.attend(layer, q.to(self.dtype), D**-0.5)
            results.append((out, q))
            usage = self.manager.stats().tiers["device"]
            assert usage.used_bytes <= usage.capacity_bytes
            self.device_peak = max(self.device_peak, usage.used_bytes)
        return results

    def check_exact(self, results, atol: float = 2e-5) -> None:
        for layer, (out, q) in enumerate(results):
            expected = reference(q, self.keys[layer], self.values[layer], D**-0.5)
            assert out.shape == q.shape and out.dtype == self.dtype
            torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=atol)


def attend_without_syncs(seq: SequenceKV, steps: int, *, seed: int = 3, dtype: torch.dtype = torch.float32) -> None:
    """``steps`` decode steps of random KV on CUDA, every layer's attention under
    ``torch.cuda.set_sync_debug_mode("error")`` (a device -> host synchronisation in it raises)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        seq.note_tokens(torch.randint(0, 1000, (1,), generator=gen))
        for layer in range(LAYERS):
            k, v, q = (torch.randn(h, 1, D, generator=gen).cuda().to(dtype) for h in (HKV, HKV, HQ))
            seq.append(layer, k, v)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = seq.attend(layer, q, D**-0.5)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert out.shape == (HQ, 1, D) and bool(torch.isfinite(out).all())
