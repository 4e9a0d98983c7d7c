"""The device tier: a slot pool on the accelerator (GPU HBM), or on the CPU where there is none."""

from __future__ import annotations

import torch

from ..blocks import BlockLayout
from .base import TierError
from .host import check_host_ram
from .pool import SlotPool


def resolve_device(accelerator: str) -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; otherwise the named torch device.

    Raises ValueError naming ``tiers.accelerator`` when CUDA is asked for and absent.
    """
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(accelerator)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"tiers.accelerator = {accelerator!r}: CUDA is not available on this machine (use auto or cpu)")
    return device


def check_device_memory(capacity_bytes: int, device: torch.device) -> None:
    """Raise TierError naming ``tiers.device`` with the figures if ``capacity_bytes`` exceeds the
    device's free memory (GPU: ``cudaMemGetInfo``; CPU: available RAM), before anything is allocated."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if capacity_bytes > free:
            raise TierError(
                f"tiers.device = {capacity_bytes} bytes ({capacity_bytes / 2**30:.2f} GiB) does not fit: {device} has "
                f"{free} bytes ({free / 2**30:.2f} GiB) free; lower tiers.device"
            )
    elif device.type == "cpu":
        check_host_ram(capacity_bytes, what="tiers.device")


class DeviceTier(SlotPool):
    """Blocks in preallocated slots on ``device`` (``n_slots = capacity_bytes // block bytes``)."""

    def __init__(self, layout: BlockLayout, capacity_bytes: int, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        if capacity_bytes >= layout.nbytes:  # (a smaller one is refused by the pool, naming the budget)
            check_device_memory(capacity_bytes // layout.nbytes * layout.nbytes, device)
        super().__init__("device", layout, capacity_bytes, device)
