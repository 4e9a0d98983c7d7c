"""Eviction policies of the device and host tiers (and the LRU order of the disk tier).

The manager keeps each tier's blocks in recency order (oldest first) and asks the policy to
rank the eligible ones (unpinned, not in flight, not held by a gather) for eviction. A policy
only orders candidates; it never moves data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence

from ..blocks import BlockKey


class EvictionPolicy(ABC):
    """Orders eviction candidates: the first yielded is evicted first."""

    name: str

    @abstractmethod
    def rank(self, candidates: Iterable[BlockKey]) -> Iterator[BlockKey]:
        """``candidates`` arrive least recently used first; yield them in eviction order."""

    def note_scores(self, keys: Sequence[BlockKey], scores: Sequence[float]) -> None:
        """Recent attention scores of blocks (ignored by policies that do not use them)."""

    def forget(self, key: BlockKey) -> None:
        """The block was deleted; drop what the policy knows of it."""


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def rank(self, candidates: Iterable[BlockKey]) -> Iterator[BlockKey]:
        return iter(candidates)


class ScorePolicy(EvictionPolicy):
    """Keeps blocks with high recent attention scores; evicts the lowest decayed score first.

    Each :meth:`note_scores` call is one tick; a score noted ``t`` ticks ago counts
    ``score * decay**t``, and a new score replaces the old one when it is larger. Blocks never
    scored count 0; ties go least recently used first.
    """

    name = "score"

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"ScorePolicy decay = {decay} must be in (0, 1]")
        self.decay = decay
        self._tick = 0
        self._scores: dict[BlockKey, tuple[float, int]] = {}

    def _value(self, key: BlockKey) -> float:
        score, tick = self._scores.get(key, (0.0, self._tick))
        return score * self.decay ** (self._tick - tick)

    def note_scores(self, keys: Sequence[BlockKey], scores: Sequence[float]) -> None:
        self._tick += 1
        for key, score in zip(keys, scores, strict=True):
            if float(score) >= self._value(key):
                self._scores[key] = (float(score), self._tick)

    def forget(self, key: BlockKey) -> None:
        self._scores.pop(key, None)

    def rank(self, candidates: Iterable[BlockKey]) -> Iterator[BlockKey]:
        return iter(sorted(candidates, key=self._value))  # stable: LRU order among equal scores


def make_policy(name: str) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "score":
        return ScorePolicy()
    raise ValueError(f"tiers.policy = {name!r}: must be one of lru, score")
