"""The host tier: a slot pool in CPU RAM, page-locked (pinned) when CUDA is present.

Pinned memory is what lets host -> device copies run as asynchronous DMA on a side stream. It
cannot be swapped out, so the pool checks the machine's available RAM before allocating and
fails with the figures rather than pushing the machine into swap or the OOM killer.
"""

from __future__ import annotations

import psutil
import torch

from ..blocks import BlockLayout
from .base import TierError
from .pool import SlotPool
from .slot_codec import SlotCodec


class HostMemoryError(TierError):
    """The host budget does not fit the machine's available RAM."""


def check_host_ram(capacity_bytes: int, *, what: str = "tiers.host") -> None:
    """Raise HostMemoryError with the figures if ``capacity_bytes`` exceeds available RAM."""
    available = psutil.virtual_memory().available
    if capacity_bytes > available:
        raise HostMemoryError(
            f"{what} = {capacity_bytes} bytes ({capacity_bytes / 2**30:.2f} GiB) does not fit: only {available} bytes "
            f"({available / 2**30:.2f} GiB) of RAM are available; lower {what}"
        )


class HostTier(SlotPool):
    """Blocks in CPU RAM slots; pinned when ``pin_memory`` (default: when CUDA is available).
    ``encoding`` (``tiers.host_encoding``): slots hold raw blocks, or int8 / int4 payloads
    (:mod:`hkv.tiers.slot_codec`), and the budget counts those bytes."""

    def __init__(self, layout: BlockLayout, capacity_bytes: int, *, pin_memory: bool | None = None, encoding: str = "none") -> None:
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        slot = SlotCodec(layout, encoding).slot_nbytes
        if capacity_bytes >= slot:  # before the pool builds its slot lists
            check_host_ram(capacity_bytes // slot * slot)
        super().__init__("host", layout, capacity_bytes, "cpu", pin_memory=pin_memory, encoding=encoding)

    def _allocate(self) -> torch.Tensor:
        check_host_ram(self.n_slots * self.slot_nbytes)  # RAM may have gone since construction
        return super()._allocate()
