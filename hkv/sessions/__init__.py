"""Persistent conversations: a sequence's KV committed to the store, resumable in any process.

``records`` encodes a session's record and model identity; ``rows`` is the work inside one
store transaction (commit, delete, verify); ``repair`` rebuilds a damaged store; ``store`` the :class:`SessionStore` over a block
store; ``locks`` the per-session writer locks; ``session`` the :class:`Session` a runtime opens
(``rt.session(name)``). Design: docs/sessions-design.md; user guide: docs/sessions.md.
"""

from .records import (
    CorruptSessionError,
    SessionError,
    SessionInfo,
    SessionLockedError,
    SessionMismatchError,
    SessionNameError,
    SessionNotFoundError,
)
from .session import RestoreReport, Session
from .store import SessionStore

__all__ = [
    "CorruptSessionError",
    "RestoreReport",
    "Session",
    "SessionError",
    "SessionInfo",
    "SessionLockedError",
    "SessionMismatchError",
    "SessionNameError",
    "SessionNotFoundError",
    "SessionStore",
]
