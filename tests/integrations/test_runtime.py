"""The runtime around a wrapped model (hkv.wrap / Runtime): failing at wrap time leaves the model as it
was, a model is wrapped once, close restores its attention and hooks, caches outside their runtime
are refused and caches never closed release their blocks."""

from __future__ import annotations

import pytest
import torch

from hkv import wrap

from helpers.models import prompt, wrap_config

transformers = pytest.importorskip("transformers")


def test_cache_outside_its_runtime_is_refused(tiny_lm, tmp_path):
    model = tiny_lm("llama")
    rt = wrap(model, wrap_config(model, tmp_path))
    cache = rt.new_cache()
    rt.close()
    with pytest.raises((RuntimeError, ValueError)), torch.inference_mode():
        model(input_ids=prompt(8), cache=cache)
    with pytest.raises(RuntimeError, match="closed"):
        rt.new_cache()


def test_device_tier_too_small_for_pinned_blocks_fails_at_wrap(tiny_lm, tmp_path):
    from hkv import ConfigError

    model = tiny_lm("llama")
    with pytest.raises(ConfigError, match="tiers.device"):
        wrap(model, wrap_config(model, tmp_path, device_blocks=2))
    assert model.config._attn_implementation != "hkv", "a failed wrap must leave the model as it was"


def test_unclosed_caches_release_their_blocks(tiny_lm, tmp_path):
    import gc

    model = tiny_lm("llama")
    ids = prompt(200, seed=7)
    # Room for one sequence's pinned blocks only: a leaked cache would make the second fail to pin.
    config = wrap_config(model, tmp_path, device_blocks=model.config.num_hidden_layers * 3 + 2)
    with wrap(model, config) as rt:
        for seed in (5, 6):  # different prompts: same-prompt blocks would share their pins
            other = prompt(200, seed=seed)
            with torch.inference_mode():
                out = model.generate(other, max_new_tokens=4, do_sample=False, cache=rt.new_cache())
            assert out.shape[1] == other.shape[1] + 4
            gc.collect()
        assert len(rt._caches) == 0
        assert rt.stats().prefetch is not None
        with rt.new_cache() as cache:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=2, do_sample=False, cache=cache)
        assert cache._closed and len(rt._caches) == 0


def test_wrapping_a_wrapped_model_is_refused(tiny_lm, tmp_path):
    model = tiny_lm("llama")
    with wrap(model, wrap_config(model, tmp_path / "a")) as rt:
        with pytest.raises(ValueError, match="already wrapped"):
            wrap(model, wrap_config(model, tmp_path / "b"))
        assert not (tmp_path / "b").exists(), "a refused wrap must not create its store"
        assert model.config._attn_implementation == "hkv"
        ids = prompt(40)
        with rt.new_cache() as cache, torch.inference_mode():
            model.generate(ids, max_new_tokens=2, do_sample=False, cache=cache)


def test_close_removes_hooks_and_restores_attention(tiny_lm, tmp_path):
    model = tiny_lm("llama")
    original = model.config._attn_implementation
    pre, post = dict(model._forward_pre_hooks), dict(model._forward_hooks)
    rt = wrap(model, wrap_config(model, tmp_path))
    assert model.config._attn_implementation == "hkv"
    assert len(model._forward_pre_hooks) == len(pre) + 1 and len(model._forward_hooks) == len(post) + 1
    rt.close()
    assert dict(model._forward_pre_hooks) == pre and dict(model._forward_hooks) == post
    assert model.config._attn_implementation == original
    # and it can be wrapped again
    wrap(model, wrap_config(model, tmp_path / "again")).close()


@pytest.mark.parametrize("enabled", ["auto", True, False])
def test_prefetcher_runs_as_prefetch_enabled_resolves(tiny_lm, tmp_path, enabled):
    from hkv import Config
    from hkv.config import AUTO_PREFETCH_MIN_CORES, cpu_cores

    model = tiny_lm("llama")
    config = Config.load(wrap_config(model, tmp_path), env={}, prefetch={"enabled": enabled})
    with wrap(model, config) as rt:
        expected = enabled if enabled != "auto" else cpu_cores() >= AUTO_PREFETCH_MIN_CORES  # no GPU here: the cores decide
        assert (rt.prefetcher is not None) == expected


def test_the_prefetcher_takes_workers_and_job_blocks_from_the_config(tiny_lm, tmp_path):
    from hkv import Config

    model = tiny_lm("llama")
    config = Config.load(wrap_config(model, tmp_path), env={}, prefetch={"enabled": True, "workers": 1, "job_blocks": 48})
    with wrap(model, config) as rt:
        assert rt.prefetcher.workers == 1 and rt.prefetcher.job_blocks == 48
