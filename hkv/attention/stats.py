"""What one sequence's attention read, and from where: per decode step and in total.

Filled by :class:`~hkv.attention.sequence.SequenceKV` (prediction and hit counts) from the
manager's :class:`~hkv.tiers.promotion.GatherReport` (resident / waited / fetched, stall time);
read by ``Runtime.stats()``, the demo and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepStats:
    """Prefetch and movement figures of one decode step / prefill forward (block counts, bytes, seconds).

    ``predicted``: blocks the prefetcher was asked for, for this step. ``needed``: past blocks
    read that are not pinned. ``hit``: needed blocks that were predicted and already on the device
    when read. ``late``: the same count as ``waited`` -- gathered blocks that a concurrent
    promotion was still moving when read (gather waited for it). ``missed``: the same count as
    ``fetched`` -- gathered blocks fetched on demand. Both copies cover every gathered block,
    not only ``needed`` ones (pinned blocks are on the device, so in practice they are needed
    blocks). ``resident`` / ``waited`` / ``fetched`` / ``stall_s`` are the manager's
    :class:`~hkv.tiers.manager.GatherReport` over every gathered block (sink and local included);
    ``stall_s`` counts only time spent because a block was not on the device (waiting for its
    promotion, or fetching it on demand), never the lock waits and bookkeeping every gather pays.
    Hit rate: ``hit / needed`` (:attr:`SequenceStats.hit_rate`); ``hit / predicted`` is the
    prediction's precision.
    """

    step: int = 0
    predicted: int = 0
    needed: int = 0
    hit: int = 0
    late: int = 0
    missed: int = 0
    resident: int = 0
    waited: int = 0
    fetched: int = 0
    stall_s: float = 0.0
    attend_s: float = 0.0
    select_s: float = 0.0  # of attend_s: choosing the blocks (scoring their summaries)
    moved_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class SequenceStats(StepStats):
    """Totals over the sequence's steps (``step`` = number of steps), plus the last step."""

    tokens: int = 0
    blocks: int = 0  # sealed blocks over all layers
    last: StepStats | None = None

    @property
    def hit_rate(self) -> float | None:
        """Share of the blocks read (``needed``) that the prefetcher had on the device in time.

        Not ``hit / predicted``: the prediction includes a margin of extra candidates
        (``prefetch.margin``), so that ratio stays below ``1 / (1 + margin)`` even when every
        block read was prefetched, and it falls when the margin grows although fewer blocks
        are then fetched on demand."""
        return self.hit / self.needed if self.needed else None

    @property
    def precision(self) -> float | None:
        """Share of the predicted blocks that were read and on the device in time."""
        return self.hit / self.predicted if self.predicted else None


COUNTERS = (  # the StepStats fields summed over steps
    "predicted", "needed", "hit", "late", "missed", "resident", "waited", "fetched", "stall_s", "attend_s", "select_s")
