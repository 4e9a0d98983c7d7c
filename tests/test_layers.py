"""The package's dependency rule (docs/architecture.md, "Who may import whom"), checked on the source.

Every ``import`` of an hkv module, at module level or inside a function, must point down the
layers below; a module of a layer may import its own layer and any lower one. Reads the source
with ``ast``, imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hkv"

# Lowest first. A module may import modules of its own layer and of the layers before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("leaves", {"errors", "config", "encoding", "blocks", "positions", "memory", "threads", "passkey", "ruler", "default_model"}),
    ("store", {"store", "remote"}),
    ("tiers", {"tiers"}),
    ("prefetch", {"prefetch"}),
    ("attention", {"attention"}),
    ("sessions", {"sessions"}),
    ("integrations", {"integrations"}),
    ("bench", {"bench"}),
    ("tune", {"tune"}),
    ("cli", {"cli"}),
]
# Leaves import nothing of hkv but these (blocks raises ConfigError for impossible budgets and
# reads lossy records through encoding).
LEAF_IMPORTS = {"blocks": {"config", "encoding"}}


def _part(module: str) -> str:
    """``hkv.tiers.manager`` -> ``tiers``; ``hkv.config`` -> ``config``; ``hkv`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(part: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if part in members:
            return index
    raise AssertionError(f"hkv.{part} is in no layer of LAYERS: add it to the table and to docs/architecture.md")


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported hkv module, line)`` for every import in ``path``, lazy ones included."""
    module = "hkv." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "hkv"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "hkv":
                found.append((target, node.lineno))
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts != ("__init__.py",))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path: Path) -> None:
    here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    bad = []
    for target, line in _imports(path):
        there = _part(target)
        if there == "":
            bad.append(f"line {line}: imports the package root hkv (import the module that defines the name)")
        elif here in LAYERS[0][1]:
            if there != here and there not in LEAF_IMPORTS.get(here, set()):
                bad.append(f"line {line}: leaf hkv.{here} imports {target}")
        elif _layer(there) > _layer(here):
            bad.append(f"line {line}: {LAYERS[_layer(here)][0]} imports {target} of the higher layer {LAYERS[_layer(there)][0]}")
    assert not bad, f"{path.relative_to(PACKAGE.parent)}:\n  " + "\n  ".join(bad)


def test_the_table_names_every_module() -> None:
    parts = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in _sources()}
    for part in parts:
        _layer(part)
