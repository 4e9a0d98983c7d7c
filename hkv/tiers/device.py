"""The device tier: a slot pool on the accelerator (GPU HBM), or on the CPU where there is none."""

from __future__ import annotations

import torch

from ..blocks import BlockLayout
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


class DeviceTier(SlotPool):
    """Blocks in preallocated slots on ``device`` (``n_slots = capacity_bytes // block bytes``)."""

    def __init__(self, layout: BlockLayout, capacity_bytes: int, device: torch.device | str = "cpu") -> None:
        super().__init__("device", layout, capacity_bytes, device)
