"""The model the benchmarks run: SmolLM2-135M-Instruct (the real GGUF weights when installed) or
its shape with random weights, and synthetic KV of its shape for filling long contexts fast."""

from __future__ import annotations

from typing import Any

import torch

# SmolLM2-135M-Instruct's shape; max_position_embeddings raised so RoPE covers 128K positions.
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)

def build_model(weights: str = "auto", *, device: str | torch.device = "cpu", max_tokens: int = 131072) -> tuple[torch.nn.Module, str]:
    """``(model, weights used)``: SmolLM2-135M with ``weights="smollm2"`` (the real GGUF, ~25 s to
    load), ``"random"`` (its shape, random weights) or ``"auto"`` (smollm2 if installed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if weights == "auto":
        from ..default_model import ModelNotInstalledError, default_model_dir

        try:
            default_model_dir()
            weights = "smollm2"
        except ModelNotInstalledError:
            weights = "random"
    if weights == "smollm2":
        from ..default_model import load_default_model

        model, _ = load_default_model()
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, max_tokens + 64)
    elif weights == "random":
        torch.manual_seed(0)
        config = LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=max_tokens + 64)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"weights = {weights!r}: expected 'auto', 'random' or 'smollm2'")
    return model.to(device).eval(), weights


def synthetic_kv(layer: int, start: int, length: int, *, kv_heads: int, head_dim: int, dtype: torch.dtype, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[kv_heads, length, head_dim]`` of tokens ``start .. start+length`` of ``layer``.

    Deterministic in (layer, start): a per-(layer, head) mean direction plus unit noise for the
    keys, unit Gaussian values.
    """
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(1_000_003 * (layer + 1) + start)
    mean = torch.randn(kv_heads, 1, head_dim, generator=torch.Generator().manual_seed(layer)).to(device) * 2.0
    keys = mean + torch.randn(kv_heads, length, head_dim, generator=g, device=device)
    values = torch.randn(kv_heads, length, head_dim, generator=g, device=device)
    return keys.to(dtype), values.to(dtype)
