"""What hkv needs to know about a model: its attention shapes, whether hkv can serve it, and
its fingerprint (the model identity inside every block key).

No transformers import here: the sessions CLI and the benchmarks use it without transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ..blocks import DTYPE_NAMES
from ..config import AttentionConfig, Config
from ..sessions.records import ModelIdentity


class UnsupportedModelError(ValueError):
    """A model hkv cannot serve (refused at wrap time, before anything is changed)."""


def model_fingerprint(model: torch.nn.Module, *, dtype: torch.dtype | None = None) -> bytes:
    """16 bytes that identify a model's KV: architecture, config shapes, dtype and a weight sample.

    The sample is the first and last 64 values of up to 8 parameter tensors spread over the
    model (xxh3-128 of their bytes), so two checkpoints of one architecture get different
    fingerprints without hashing gigabytes. ``dtype`` is the KV storage dtype if it differs from
    the weights' dtype (blocks stored as fp16 from an fp32 model are not the same blocks).
    """
    config = getattr(model, "config", None)
    params = list(model.named_parameters())
    model_dtype = params[0][1].dtype if params else torch.float32
    shapes = {}
    if config is not None:
        for name in (
            "model_type",
            "architectures",
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "rope_theta",
            "rope_parameters",
            "rope_scaling",
            "max_position_embeddings",
            "rms_norm_eps",
        ):
            if hasattr(config, name):
                shapes[name] = getattr(config, name)
    shapes["weights_dtype"] = str(model_dtype)
    shapes["kv_dtype"] = str(dtype or model_dtype)
    shapes["class"] = type(model).__name__
    hasher = xxhash.xxh3_128()
    hasher.update(json.dumps(shapes, sort_keys=True, default=str).encode())
    _hash_weight_sample(params, hasher)
    return hasher.digest()


def _hash_weight_sample(params: list[tuple[str, torch.Tensor]], hasher) -> None:
    """Feed the first and last 64 values of up to 8 parameter tensors spread over the model
    (with their names and shapes) to ``hasher``."""
    if not params:
        return
    count = min(8, len(params))
    picks = sorted({round(i * (len(params) - 1) / max(count - 1, 1)) for i in range(count)})
    for index in picks:
        name, tensor = params[index]
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32).contiguous()
        hasher.update(name.encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(sample.numpy().tobytes())


def model_description(model: torch.nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, object]:
    """The fields a session records about the model that produced its KV (JSON-able): class,
    model_type, num_layers, num_q_heads, num_kv_heads, head_dim, hidden_size, vocab_size,
    weights_dtype, kv_dtype and weights_sample (xxh3-64 hex of the weight sample
    :func:`model_fingerprint` hashes). ``dtype``: the KV storage dtype (default: the weights')."""
    config = getattr(model, "config", None)
    params = list(model.named_parameters())
    model_dtype = params[0][1].dtype if params else torch.float32
    q_heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // q_heads if hidden and q_heads else None)
    sample = xxhash.xxh3_64()
    _hash_weight_sample(params, sample)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_q_heads": q_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or q_heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "vocab_size": getattr(config, "vocab_size", None),
        "weights_dtype": str(model_dtype).removeprefix("torch."),
        "kv_dtype": str(dtype or model_dtype).removeprefix("torch."),
        "weights_sample": sample.hexdigest(),
    }


def tokenizer_hash(tokenizer) -> str | None:
    """xxh3-64 hex of a tokenizer's vocabulary (sorted ``token -> id`` pairs) and special tokens;
    None when ``tokenizer`` is None."""
    if tokenizer is None:
        return None
    vocab = sorted((str(token), int(index)) for token, index in tokenizer.get_vocab().items())
    special = sorted(str(token) for token in getattr(tokenizer, "all_special_tokens", []))
    data = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return xxhash.xxh3_64_hexdigest(data.encode())


def attention_signature(attention: AttentionConfig) -> str:
    """The settings of an ``AttentionConfig`` that change the KV a model computes.

    Exact mode computes the model's own KV (chunking changes rounding only): ``"exact"``. In
    sparse mode, which blocks each layer attends (budget, sink, local window, prefill chunk) and
    where far blocks are placed (positions) change every hidden state after the first layer,
    so the KV of later layers differs: those settings are part of the signature."""
    if attention.mode == "exact":
        return "exact"
    return (
        f"sparse budget={attention.budget_tokens} sink={attention.sink_tokens} local={attention.local_tokens} "
        f"chunk={attention.prefill_chunk_tokens} positions={getattr(attention, 'positions', 'original')}"
    )


def kv_fingerprint(model: torch.nn.Module, *, dtype: torch.dtype | None = None, attention: AttentionConfig | None = None) -> bytes:
    """16 bytes that block keys are made from: :func:`model_fingerprint` combined with the
    :func:`attention_signature` (so KV computed in sparse mode is never taken for exact KV, nor
    KV of one sparse budget for another's). ``attention``: an AttentionConfig, or None (exact)."""
    signature = "exact" if attention is None else attention_signature(attention)
    return xxhash.xxh3_128(model_fingerprint(model, dtype=dtype) + signature.encode()).digest()


def model_identity(model: torch.nn.Module, dtype: torch.dtype | None = None, tokenizer: Any = None,
                   attention: AttentionConfig | None = None) -> ModelIdentity:  # fmt: skip
    """The :class:`~hkv.sessions.records.ModelIdentity` a session records and checks:
    :func:`kv_fingerprint` (hex), :func:`model_description` plus the attention signature,
    :func:`tokenizer_hash`."""
    description = model_description(model, dtype=dtype)
    description["attention"] = "exact" if attention is None else attention_signature(attention)
    return ModelIdentity(
        fingerprint=kv_fingerprint(model, dtype=dtype, attention=attention).hex(),
        description=description,
        tokenizer=tokenizer_hash(tokenizer),
    )


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Attention shapes of a decoder-only model hkv can serve."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    vocab_size: int | None = None  # token ids must be below it (None: unknown, not checked)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelSpec:
        """The spec of ``model``, or :class:`UnsupportedModelError` saying why hkv cannot serve it."""
        config = getattr(model, "config", None)
        name = type(model).__name__
        if config is None or not hasattr(model, "set_attn_implementation"):
            raise UnsupportedModelError(f"{name} is not a transformers PreTrainedModel; hkv.wrap needs one")
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"{name} is an encoder-decoder model; hkv serves decoder-only causal LMs")
        if not getattr(model, "_supports_attention_backend", False) or not model._can_set_attn_implementation():
            raise UnsupportedModelError(
                f"{name} does not route attention through transformers' AttentionInterface, "
                "so hkv cannot replace its attention"
            )
        if not hasattr(model, "generate"):
            raise UnsupportedModelError(f"{name} cannot generate; hkv wraps causal LMs (…ForCausalLM)")
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            other = sorted({t for t in layer_types if t != "full_attention"})
            if other:
                raise UnsupportedModelError(
                    f"{name} has layers of type {other} (config.layer_types); hkv serves full-attention "
                    "layers only (no sliding-window, chunked or linear attention)"
                )
        if getattr(config, "sliding_window", None) is not None:
            raise UnsupportedModelError(
                f"{name} uses sliding-window attention (config.sliding_window = {config.sliding_window}); "
                "hkv serves full-attention layers only. Set sliding_window=None if the model was trained without it."
            )
        for key in ("attn_logit_softcapping", "attention_chunk_size"):
            if getattr(config, key, None) is not None:
                raise UnsupportedModelError(f"{name} uses config.{key} = {getattr(config, key)}; hkv does not support it")
        attention = [m for m in model.modules() if _is_attention_module(m)]
        num_layers = config.num_hidden_layers
        if len(attention) != num_layers or sorted(m.layer_idx for m in attention) != list(range(num_layers)):
            raise UnsupportedModelError(
                f"{name}: found {len(attention)} attention modules with a layer_idx for "
                f"{num_layers} layers; hkv needs one self-attention module per layer"
            )
        if any(getattr(m, "is_causal", True) is False for m in attention):
            raise UnsupportedModelError(f"{name} has non-causal attention layers; hkv serves causal LMs")
        q_heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
        param = next(model.parameters())
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None)
        return cls(num_layers, q_heads, kv_heads, head_dim, param.dtype, param.device, vocab)


def _is_attention_module(module: torch.nn.Module) -> bool:
    return (
        type(module).__name__.endswith("Attention")
        and isinstance(getattr(module, "layer_idx", None), int)
        and hasattr(module, "config")
    )


def storage_dtype(config: Config, model_dtype: torch.dtype) -> torch.dtype:
    """``tiers.dtype`` as a torch dtype; "auto" is the model's dtype."""
    if config.tiers.dtype == "auto":
        return model_dtype
    return DTYPE_NAMES[config.tiers.dtype]
