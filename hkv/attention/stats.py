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

    Every block the attention reads (``read``) is counted in exactly one of five buckets::

        read = pinned + hit + unpredicted + waited + fetched

    * ``pinned``: sink / local blocks (pinned, so always on the device);
    * ``hit``: predicted for this read by the step's prefetch and on the device when gathered
      (predicted blocks that were there already count too: the prefetcher skips those);
    * ``unpredicted``: on the device when gathered but not among this read's predicted blocks:
      prefetch off, a read with no prediction pending (the first read of a forward, the later
      query chunks of a prefill) or a block beyond the layer's prefetch share; such blocks
      stayed on the device since an earlier read or the prefill. A decode step's read of a
      layer whose blocks are all on the device goes through its block table (``table_reads``)
      and predicts nothing: its blocks count here;
    * ``waited``: in flight when gathered (a prefetch promotion was still moving it);
    * ``fetched``: not on the device when gathered, fetched on demand.

    ``needed`` = ``read - pinned`` = ``hit + unpredicted + waited + fetched``: the past blocks
    read that are not pinned. The gather itself tells residency, so a hit is never also waited
    for or fetched (before 2026-12 a residency check just ahead of the gather counted hits, and
    left out predicted blocks whose prefetch job had not finished by then: those reads were in
    no bucket). ``predicted``: blocks the prefetcher was asked for, for this step. ``late`` /
    ``missed``: the same counts as ``waited`` / ``fetched`` (older names). ``resident``: gathered
    blocks on the device at once (``pinned + hit + unpredicted``). ``resident`` / ``waited`` /
    ``fetched`` / ``stall_s`` come from the manager's :class:`~hkv.tiers.promotion.GatherReport`;
    ``stall_s`` counts only time spent because a block was not on the device (waiting for its
    promotion, or fetching it on demand), never the lock waits and bookkeeping every gather pays.
    Hit rate: ``hit / needed`` (:attr:`SequenceStats.hit_rate`); ``hit / predicted`` is the
    prediction's precision.
    """

    step: int = 0
    predicted: int = 0
    read: int = 0
    pinned: int = 0
    needed: int = 0
    hit: int = 0
    unpredicted: int = 0
    late: int = 0
    missed: int = 0
    resident: int = 0
    waited: int = 0
    fetched: int = 0
    stall_s: float = 0.0
    attend_s: float = 0.0
    select_s: float = 0.0  # of attend_s: choosing the blocks (scoring their summaries)
    append_s: float = 0.0  # appending the new tokens' KV (sealing full blocks into the tiers)
    table_reads: int = 0  # layer reads selected and read on the device through the block table (block_table.py)
    kernel_s: float = 0.0  # of attend_s: in the kernels that read the step's bytes (scoring matmuls, the gather's copy, attention)
    moved_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def host_s(self) -> float:
        """Seconds of hkv's own work outside the kernels that read the step's bytes and outside
        stalls: ``attend_s + append_s - kernel_s - stall_s``. Selection's small ops (top-k,
        normalising), block bookkeeping, the manager's lock, copying the fresh window and the
        prefetch submissions are in it. On a GPU, where kernels run asynchronously, this is the
        host time the step's launches and bookkeeping take; on a CPU it is the same work run
        inline. Divided by the layers and steps, the figure ``hkv bench decode`` prints."""
        return max(0.0, self.attend_s + self.append_s - self.kernel_s - self.stall_s)

    @property
    def read_buckets(self) -> dict[str, int]:
        """The blocks read, by bucket: ``pinned``, ``hit``, ``unpredicted``, ``waited``,
        ``fetched``; they sum to :attr:`read`."""
        return {"pinned": self.pinned, "hit": self.hit, "unpredicted": self.unpredicted, "waited": self.waited,
                "fetched": self.fetched}  # fmt: skip


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
    "predicted", "read", "pinned", "needed", "hit", "unpredicted", "late", "missed", "resident", "waited", "fetched",
    "stall_s", "attend_s", "select_s", "append_s", "kernel_s", "table_reads")
