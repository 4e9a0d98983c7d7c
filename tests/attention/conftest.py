"""Fixtures of the attention tests: SequenceKVs over a real TierManager, closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from helpers.sequences import open_sequence


@pytest.fixture
def open_seq() -> Iterator[Callable[..., tuple]]:
    """``open_seq(config, **kwargs) -> (manager, seq)``: :func:`helpers.sequences.open_sequence`;
    at teardown every sequence opened is closed, then every manager."""
    opened: list[tuple] = []

    def factory(config, **kwargs) -> tuple:
        manager, seq = open_sequence(config, **kwargs)
        opened.append((manager, seq))
        return manager, seq

    yield factory
    for _, seq in opened:
        seq.close()
    for manager in dict.fromkeys(manager for manager, _ in opened):
        manager.close()
