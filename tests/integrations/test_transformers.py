"""hkv inside transformers (HkvCache and the hkv attention): exact mode equals DynamicCache on tiny
random models of three architectures, prefetch on/off equality, the device budget, a wrapped model's
own attention with other caches, batch and padding refusals; the same on CUDA."""

from __future__ import annotations

import pytest
import torch

from hkv import wrap
from hkv.integrations.transformers import HkvCache

from helpers.models import BLOCK, baseline, block_bytes, prompt, wrap_config

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32


def _baseline(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return baseline(model, ids, NEW_TOKENS)


def _spy_device_bytes(rt) -> list[int]:
    """Record the device tier's bytes after every gather (i.e. inside every attention call)."""
    seen: list[int] = []
    gather = rt.manager.gather

    def spy(*args, **kwargs):
        out = gather(*args, **kwargs)
        seen.append(rt.manager.stats().tiers["device"].used_bytes)
        return out

    rt.manager.gather = spy
    return seen


# ---------------------------------------------------------------------------------------------
# Tiny random models (fast)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_exact_mode_matches_dynamic_cache(tiny_lm, arch, tmp_path):
    model = tiny_lm(arch)
    ids = prompt()
    expected = _baseline(model, ids)
    config = wrap_config(model, tmp_path)
    with wrap(model, config) as rt:
        seen = _spy_device_bytes(rt)
        out = rt.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out, expected), f"{arch}: hkv exact mode diverged from DynamicCache"

        # The same through the model's own generate with hkv's cache.
        with rt.new_cache() as cache:
            with torch.inference_mode():
                out2 = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache=cache)
            assert isinstance(cache, HkvCache) and cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
        assert torch.equal(out2, expected)

        stats = rt.stats()
        budget = int(config.tiers.device)
        kv_bytes = model.config.num_hidden_layers * (ids.shape[1] + NEW_TOKENS) * block_bytes(model) // BLOCK
        assert budget < kv_bytes / 2, "the test must keep most of the KV off the device"
        assert stats.tiers["device"]["capacity_bytes"] == budget
        assert stats.device_peak_bytes <= budget
        assert seen and max(seen) <= budget
        assert stats.tiers["host"]["blocks"] + stats.tiers["disk"]["blocks"] > 0, "blocks must live below the device"
        assert stats.generated_tokens == NEW_TOKENS and stats.prompt_tokens == ids.shape[1] - 1
    # Closing restores the model.
    assert model.config._attn_implementation != "hkv"
    assert torch.equal(_baseline(model, ids), expected)


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_prefetch_never_changes_results(tiny_lm, mode, tmp_path):
    model = tiny_lm("llama", layers=3)
    ids = prompt(400, seed=3)
    outputs = []
    for prefetch in (True, False):
        config = wrap_config(model, tmp_path / str(prefetch), mode=mode, prefetch=prefetch)
        with wrap(model, config) as rt:
            outputs.append(rt.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
            stats = rt.stats()
            assert stats.device_peak_bytes <= int(config.tiers.device)
    assert torch.equal(outputs[0], outputs[1])
    if mode == "exact":
        assert torch.equal(outputs[0], _baseline(model, ids))


def test_baseline_runs_unchanged_while_wrapped(tiny_lm, tmp_path):
    model = tiny_lm("llama")
    ids = prompt(100)
    expected = _baseline(model, ids)
    with wrap(model, wrap_config(model, tmp_path)):
        assert model.config._attn_implementation == "hkv"
        assert torch.equal(_baseline(model, ids), expected)  # DynamicCache -> original attention
        with torch.inference_mode():
            assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), expected)


def test_refuses_batch_of_two(tiny_lm, tmp_path):
    model = tiny_lm("llama")
    with wrap(model, wrap_config(model, tmp_path)) as rt:
        ids = prompt(40).repeat(2, 1)
        with pytest.raises(ValueError, match="batch size 2"):
            rt.generate(ids, max_new_tokens=2)
        with pytest.raises(ValueError, match="batch size 2"), torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, cache=rt.new_cache())


def test_refuses_padding(tiny_lm, tmp_path):
    model = tiny_lm("llama")
    with wrap(model, wrap_config(model, tmp_path)) as rt:
        ids = prompt(40)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        with pytest.raises(ValueError, match="padding"):
            rt.generate(ids, attention_mask=mask, max_new_tokens=2)
        with pytest.raises(ValueError, match="padding"), torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=2, cache=rt.new_cache())


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; run by scripts/gpu_check.sh)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_mode_matches_dynamic_cache_on_cuda(tiny_lm, arch, tmp_path):
    model = tiny_lm(arch).to("cuda")
    ids = prompt().to("cuda")
    expected = _baseline(model, ids)
    config = wrap_config(model, tmp_path)
    with wrap(model, config) as rt:
        assert rt.manager.device.type == "cuda"
        out = rt.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = rt.stats()
    assert torch.equal(out, expected)
    assert stats.device_peak_bytes <= int(config.tiers.device)
