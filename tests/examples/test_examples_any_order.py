"""The examples that load SmolLM2 run from the repository root with the README's commands in any
order: after ``hkv demo``, before it and after each other, in one working folder. Each keeps its
own store folder (./hkv-store for the demo, ./hkv-store-wrap, ./hkv-store-example): a store
holds blocks of one layout, and wrap_passkey.py keeps float16 blocks where the demo kept the
model's float32 ones before it planned its budgets (sharing ./hkv-store, the second one failed with
a StoreError).

Each command is a fresh process (``python examples/...`` with the folder as its working
directory), as a user runs them; the prompts are shortened through the examples' own arguments
(``hkv demo --tokens``, ``wrap_passkey.py TOKENS``). Several minutes on a 2-core CPU: slow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(cwd: Path, *args: str) -> str:
    env = {name: value for name, value in os.environ.items() if not name.startswith("HKV_")}  # the examples' own configs
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")  # `hkv demo` without --config keeps the rates it measures there
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{' '.join(args)} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def _hkv(cwd: Path, *args: str) -> str:
    return _run(cwd, "-m", "hkv.cli.app", *args)  # the `hkv` command (hkv.cli.app:app)


@pytest.mark.slow
def test_examples_run_in_any_order_in_one_folder(tmp_path: Path, smollm2_installed: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(EXAMPLES, root / "examples")

    first = _hkv(root, "demo", "--tokens", "1024", "--answer-tokens", "4")
    assert "session 'demo' in hkv-store: new" in first and "saved as session 'demo'; run `hkv demo` again" in first, first

    wrapped = _run(root, "examples/wrap_passkey.py", "768")  # after the demo, in the same folder
    assert wrapped.startswith("key ") and "blocks read =" in wrapped, wrapped

    chat = _run(root, "examples/persist_chat.py", "My name is Ada. Please remember it.")
    assert "new session" in chat and "session 'example':" in chat, chat
    again = _run(root, "examples/persist_chat.py", "What is my name?")
    assert "resumed" in again, again

    tuned = _run(root, "examples/tune_budgets.py")
    assert "KV per token 256 bytes" in tuned and "reads:" in tuned, tuned

    resumed = _hkv(root, "demo", "--answer-tokens", "4")  # after every example: resumes its session
    assert "session 'demo' in hkv-store: resumed" in resumed, resumed

    wrapped_again = _run(root, "examples/wrap_passkey.py", "768")  # its own store, reused
    assert wrapped_again.startswith("key "), wrapped_again

    # one store folder each (wrap_passkey.py's appears only once blocks spill to disk: not at 768 tokens)
    stores = {path.name for path in root.iterdir() if path.name.startswith("hkv-store")}
    assert {"hkv-store", "hkv-store-example"} <= stores <= {"hkv-store", "hkv-store-example", "hkv-store-wrap"}, stores
