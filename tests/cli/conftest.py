"""Fixtures of the CLI tests: the tiny model and the config that make the stores the commands read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import hkv


@pytest.fixture
def cli_model(tiny_lm) -> torch.nn.Module:
    """A tiny random Llama (tied embeddings, head_dim 16, logits as initialised) for stores and chats."""
    return tiny_lm("llama", sharpen=None, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True)


@pytest.fixture
def cli_config() -> Callable[..., hkv.Config]:
    """``cli_config(path, **attention)``: small budgets, 16-token blocks, the store at ``path``."""

    def store_config(path: Path, **attention: Any) -> hkv.Config:
        return hkv.Config.load(tiers={"path": str(path), "device": "4MiB", "host": "4MiB", "disk": "64MiB"},
                               attention={"block_tokens": 16, "sink_tokens": 16, "local_tokens": 32, "budget_tokens": 96,
                                          "prefill_chunk_tokens": 128, **attention})  # fmt: skip

    return store_config
