"""Fixtures of the session tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hkv.sessions.store import SessionStore
from hkv.tiers.disk import DiskTier

from helpers.records import LAYOUT, REC


@pytest.fixture
def store(store_path: Path) -> Iterator[SessionStore]:
    """A session store over a new disk tier of 64 records (writer batches of 8), closed at teardown."""
    disk = DiskTier(store_path, LAYOUT, 64 * REC, writer_batch=8)
    yield SessionStore(disk)
    disk.close()
