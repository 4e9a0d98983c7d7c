"""hkv on the real SmolLM2-135M (slow; one model for the whole test run, the ``smollm2`` fixture):
exact mode equals DynamicCache with most of the KV off the device, and sparse mode finds a passkey
that full attention finds, with prefetch hits."""

from __future__ import annotations

import pytest
import torch

from hkv import Config, wrap

from helpers.models import baseline

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

NEW_TOKENS = 32


def _baseline(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return baseline(model, ids, NEW_TOKENS)


def _smol_block_bytes(model, block_tokens: int) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * block_tokens * c.head_dim * 4


@pytest.mark.slow
def test_smollm2_exact_matches_dynamic_cache(smollm2, tmp_path):
    model, tokenizer = smollm2
    from hkv.passkey import passkey_prompt

    ids, _ = passkey_prompt(tokenizer, 1200, 0.5, seed=7)
    ids = torch.tensor([ids])
    expected = _baseline(model, ids)
    block = 64
    layers = model.config.num_hidden_layers
    size = _smol_block_bytes(model, block)
    kv_bytes = layers * (ids.shape[1] + NEW_TOKENS) * size // block
    # Pinned sink (1 block) + local (2 blocks) per layer, plus a few blocks to gather through.
    device = layers * 3 * size + 8 * size
    assert device * 4 < kv_bytes
    config = Config(
        tiers={"device": device, "host": kv_bytes // 2, "disk": "1GiB", "path": str(tmp_path / "store")},
        attention={"mode": "exact", "block_tokens": block, "sink_tokens": 64, "local_tokens": 128, "prefill_chunk_tokens": 512},
    )
    with wrap(model, config) as rt:
        out = rt.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = rt.stats()
    assert torch.equal(out, expected), tokenizer.decode(out[0, ids.shape[1] :]) + " != " + tokenizer.decode(expected[0, ids.shape[1] :])
    assert stats.device_peak_bytes <= device
    assert stats.tiers["host"]["blocks"] + stats.tiers["disk"]["blocks"] > 0


@pytest.mark.slow
def test_smollm2_sparse_passkey(smollm2, tmp_path):
    model, tokenizer = smollm2
    from hkv.passkey import passkey_answer, passkey_prompt

    n_tokens, block = 4000, 64
    layers = model.config.num_hidden_layers
    size = _smol_block_bytes(model, block)
    kv_bytes = layers * n_tokens * size // block
    budget_tokens = 960  # <= 25% of the context
    config = Config(
        tiers={"device": kv_bytes // 4, "host": kv_bytes // 2, "disk": "1GiB", "path": str(tmp_path / "store")},
        attention={
            "mode": "sparse",
            "block_tokens": block,
            "budget_tokens": budget_tokens,
            "sink_tokens": 64,
            "local_tokens": 256,
            "prefill_chunk_tokens": 1024,
        },
        prefetch={"enabled": True},
    )
    assert budget_tokens <= n_tokens // 4
    answered_full = answered_hkv = 0
    hits = 0
    with wrap(model, config) as rt:
        for trial, depth in enumerate((0.2, 0.8)):  # early and late (every depth: hkv bench passkey)
            ids, key = passkey_prompt(tokenizer, n_tokens, depth, seed=100 + trial)
            ids = torch.tensor([ids])
            with torch.inference_mode():
                full = model.generate(ids, max_new_tokens=7, do_sample=False, cache=DynamicCache(config=model.config))
            full_ok = passkey_answer(tokenizer, full[0, ids.shape[1] :]) == key
            out = rt.generate(ids, max_new_tokens=7, do_sample=False)
            hkv_ok = passkey_answer(tokenizer, out[0, ids.shape[1] :]) == key
            answered_full += full_ok
            answered_hkv += hkv_ok
            assert hkv_ok or not full_ok, (
                f"depth {depth}: full attention answers {key}, hkv answered "
                f"{tokenizer.decode(out[0, ids.shape[1]:])!r}"
            )
            stats = rt.stats()
            hits += _prefetch_hits(stats.prefetch)
            assert stats.device_peak_bytes <= kv_bytes // 4
    assert answered_full >= 1, "full attention never found the key; the prompt is broken"
    assert hits > 0, "prefetch never hit"


def _prefetch_hits(stats) -> int:
    """``SequenceStats.hit`` of the runtime's last sequence."""
    assert stats is not None, "the runtime reported no sequence stats"
    return int(stats.hit)
