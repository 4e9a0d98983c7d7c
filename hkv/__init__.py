"""hkv: a tiered, attention-guided KV cache for million-token contexts on ordinary hardware."""

from typing import TYPE_CHECKING, Any

from .blocks import BlockKey, BlockLayout
from .config import Config, ConfigError

if TYPE_CHECKING:
    from .integrations.runtime import Runtime, wrap
    from .sessions import (
        CorruptSessionError,
        Session,
        SessionError,
        SessionLockedError,
        SessionMismatchError,
        SessionNameError,
        SessionNotFoundError,
    )

__all__ = [
    "BlockKey", "BlockLayout", "Config", "ConfigError", "CorruptSessionError", "Runtime", "Session", "SessionError",
    "SessionLockedError", "SessionMismatchError", "SessionNameError", "SessionNotFoundError", "wrap",
]  # fmt: skip
__version__ = "0.1.0"

# Imported on first use, to keep `import hkv` (and `hkv config`) free of transformers and the
# store; no import circle hides behind this (tests/test_layers.py: no module imports `hkv` itself).
_LAZY = {"wrap", "Runtime"}
_LAZY_SESSIONS = {
    "Session", "SessionError", "SessionLockedError", "SessionMismatchError", "SessionNameError", "SessionNotFoundError",
    "CorruptSessionError",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .integrations import runtime as _integration

        return getattr(_integration, name)
    if name in _LAZY_SESSIONS:
        from . import sessions as _sessions

        return getattr(_sessions, name)
    raise AttributeError(f"module 'hkv' has no attribute {name!r}")
