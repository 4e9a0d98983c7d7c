"""Next-layer prefetch: the query estimate is the layer's own query path, the hooks predict
layers 1.. at decode steps, and the output never changes (bitwise) with them on or off."""

from __future__ import annotations

import logging

import pytest
import torch

import hkv
from hkv import Config
from hkv.integrations.next_layer import NextLayerHooks, query_paths

from helpers.models import TINY_LM, prompt, tiny_lm, wrap_config


def _qwen3() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(**{**TINY_LM, "head_dim": 16, "use_sliding_window": False})
    return transformers.Qwen3ForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_query_path_is_the_layers_own_query(arch):
    """Given a layer's own input, its QueryPath makes exactly the queries its attention makes
    before RoPE (Qwen3 adds a per-head q_norm)."""
    model = _qwen3() if arch == "qwen3" else tiny_lm(arch, layers=3)
    paths = query_paths(model)
    assert paths is not None and len(paths) == model.config.num_hidden_layers
    assert (paths[0].q_norm is not None) == (arch == "qwen3")
    inputs, queries = {}, {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: inputs.__setitem__(i, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        last = layer.self_attn.q_norm if arch == "qwen3" else layer.self_attn.q_proj
        handles.append(last.register_forward_hook(lambda m, a, out, i=i: queries.__setitem__(i, out)))
    with torch.no_grad():
        model(prompt(1))  # one token: [1, 1, hidden]
    for handle in handles:
        handle.remove()
    for i, path in enumerate(paths):
        with torch.no_grad():
            mine = path.query(inputs[i])
        assert mine.shape == (path.q_heads, path.head_dim)
        assert torch.equal(mine, queries[i].reshape(path.q_heads, path.head_dim)), i


def test_a_layer_without_the_llama_layout_gets_no_hooks():
    model = tiny_lm("llama", layers=2)
    model.model.layers[1].self_attn.q_proj = torch.nn.Identity()
    assert query_paths(model) is None
    assert NextLayerHooks.install(model) is None


def _generate(model, config: Config, ids: torch.Tensor, new_tokens: int, spy: list[int] | None = None):
    with hkv.wrap(model, config) as rt:
        with rt.new_cache() as cache:
            if spy is not None:  # count the predictions the hooks make, per layer
                ahead = cache.sequence.prefetch_ahead
                cache.sequence.prefetch_ahead = lambda layer, *rest: (spy.append(layer), ahead(layer, *rest))[1]
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache=cache)
            stats = cache.sequence.stats()
        hooked = rt._next_layer is not None
    return out, stats, hooked


@pytest.mark.parametrize("positions", ["original", "remap"])
def test_next_layer_prefetch_never_changes_the_output(tmp_path, positions):
    model = tiny_lm("llama", layers=3)
    ids = prompt(300)
    base = wrap_config(model, tmp_path, mode="sparse", positions=positions)
    on = Config.load(base, env={}, prefetch={"next_layer": True})
    off = Config.load(base, env={}, prefetch={"next_layer": False}, tiers={"path": str(tmp_path / "off")})
    spy: list[int] = []
    out_on, stats_on, hooked_on = _generate(model, on, ids, 12, spy)
    out_off, stats_off, hooked_off = _generate(model, off, ids, 12)
    assert hooked_on and not hooked_off
    assert torch.equal(out_on, out_off)
    # the 11 decode steps (the prefill made the first token): layers 1 and 2 predicted by the
    # hooks of layers 0 and 1, once each per step
    assert spy == [1, 2] * 11
    assert stats_on.predicted > 0 and stats_off.predicted > 0


def test_next_layer_hooks_are_off_in_exact_mode_and_without_prefetch(tmp_path):
    model = tiny_lm("llama", layers=2)
    for config in (wrap_config(model, tmp_path, mode="exact"), wrap_config(model, tmp_path, mode="sparse", prefetch=False)):
        with hkv.wrap(model, config) as rt:
            assert rt._next_layer is None
    sparse = wrap_config(model, tmp_path, mode="sparse")
    with hkv.wrap(model, sparse) as rt:
        assert rt._next_layer is None  # off by default
    with hkv.wrap(model, Config.load(sparse, env={}, prefetch={"next_layer": True})) as rt:
        assert rt._next_layer is not None
    # closing the runtime removed the hooks: a plain forward runs none
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)


def test_a_failing_prediction_is_logged_once_and_the_output_stays(tmp_path, caplog):
    model = tiny_lm("llama", layers=3)
    ids = prompt(200)
    config = wrap_config(model, tmp_path, mode="sparse")
    expected, _, _ = _generate(model, Config.load(config, env={}, prefetch={"next_layer": False}), ids, 6)
    failing = Config.load(config, env={}, tiers={"path": str(tmp_path / "failing")}, prefetch={"next_layer": True})
    with hkv.wrap(model, failing) as rt, rt.new_cache() as cache:
        def broken(*args):
            raise RuntimeError("prediction broke")

        cache.sequence.prefetch_ahead = broken
        with caplog.at_level(logging.WARNING, logger="hkv.integrations.next_layer"), torch.inference_mode():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
        assert rt._next_layer.failed and not cache.sequence.predicted_ahead  # every layer predicts its next step again
        assert cache.sequence.stats().predicted > 0
    assert torch.equal(out, expected)
    assert sum("next-layer prefetch failed" in r.getMessage() for r in caplog.records) == 1
