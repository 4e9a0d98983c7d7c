"""What hkv knows of a model (hkv.integrations.model): the models it refuses to wrap and the
model fingerprint."""

from __future__ import annotations

import pytest
import torch

from hkv import Config, wrap
from hkv.integrations.model import UnsupportedModelError, model_fingerprint

transformers = pytest.importorskip("transformers")
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402


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


def test_fingerprint_is_stable_and_specific(tiny_lm):
    a, b = tiny_lm("llama", seed=0), tiny_lm("llama", seed=1)
    assert model_fingerprint(a) == model_fingerprint(a) and len(model_fingerprint(a)) == 16
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(a, dtype=torch.float16)
    assert model_fingerprint(a) != model_fingerprint(tiny_lm("qwen2", seed=0))
