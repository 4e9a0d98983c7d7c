"""Tiny random transformers models, a byte tokenizer, and the configs and baselines the
runtime tests wrap them with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hkv import Config

BLOCK = 16  # block_tokens of the tiny-model configs

TINY_LM = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def tiny_lm(arch: str = "llama", *, layers: int | None = None, seed: int | None = 0, sharpen: float | None = 8.0,
            **config: Any) -> torch.nn.Module:
    """A tiny random causal LM of ``arch`` ("llama", "qwen2" or "mistral"), in eval mode.

    ``TINY_LM`` with ``config`` overriding or adding config fields (``layers`` is
    ``num_hidden_layers``); qwen2 and mistral get full attention unless ``config`` says otherwise.
    ``torch.manual_seed(seed)`` first (``None``: not seeded). ``sharpen`` multiplies the LM head
    (random init gives near-uniform logits; sharper ones make greedy decoding well defined);
    ``None`` leaves the model as initialised.
    """
    import transformers  # its model classes are imported on first use: only the one asked for

    fields = {**TINY_LM, **config}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    if seed is not None:
        torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{"use_sliding_window": False, **fields}))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**{"sliding_window": None, **fields}))
    else:
        raise ValueError(arch)
    if sharpen is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    return model.eval()


class ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256): enough for passkey prompts, sessions and the
    demo on a tiny model."""

    name_or_path = "bytes"
    eos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {bytes([i]).decode("latin-1"): i for i in range(256)}

    def __len__(self) -> int:
        return 256


def block_bytes(model: torch.nn.Module, itemsize: int = 4, block: int = BLOCK) -> int:
    """Bytes of one layer's K and V for ``block`` tokens of ``model`` (fp32 by default)."""
    c = model.config
    return 2 * c.num_key_value_heads * block * (c.hidden_size // c.num_attention_heads) * itemsize


def prompt(n: int = 300, seed: int = 1) -> torch.Tensor:
    """``[1, n]`` random token ids below 256."""
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def baseline(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate`` with transformers' own ``DynamicCache``: what hkv must reproduce."""
    from transformers import DynamicCache

    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache=DynamicCache(config=model.config))


def wrap_config(model: torch.nn.Module, tmp_path: Path, *, mode: str = "exact", prefetch: bool = True,
                device_blocks: int | None = None, **attention: Any) -> Config:
    """Tiny blocks; the device tier holds the pinned sink/local blocks of every layer plus a few."""
    layers = model.config.num_hidden_layers
    sink, local = BLOCK, 2 * BLOCK
    if device_blocks is None:
        device_blocks = layers * (sink + local) // BLOCK + 6
    size = block_bytes(model)
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
