"""What `hkv tune` measures of this machine: free capacity per tier and the rates hkv moves
blocks at, through hkv's own paths (a TierManager moving blocks host -> device, a BlockStore
reading blocks cold from disk), not raw copies, so that the cost model predicts what hkv does."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from ..bench.disk import measure_disk
from ..bench.tiers import measure_block_moves
from ..blocks import BlockLayout
from ..config import cpu_cores
from ..store.space import free_bytes


@dataclass(slots=True)
class MachineProfile:
    """Capacities in bytes, rates in GB/s (10^9 B/s) of block payload."""

    cores: int
    gpu: str | None  # the GPU's name, None on a CPU machine
    device_free_bytes: int  # free GPU memory, or available RAM where the device tier is the CPU
    host_free_bytes: int  # available RAM
    disk_free_bytes: int  # free on the filesystem of the store folder
    device_gbps: float  # reading device memory (summary scoring, gathers): a device-to-device copy
    host_to_device_gbps: float  # hkv's promotion of blocks host -> device (TierManager.promote)
    disk_read_gbps: float  # hkv's cold random block reads (BlockStore.get_many_into, page cache dropped where allowed)
    disk_cold: bool  # whether the page cache could be dropped before the disk reads

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device_copy_gbps(device: torch.device, nbytes: int) -> float:
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    times = []
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / min(times[1:]) / 1e9


def _existing_parent(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass(frozen=True, slots=True)
class Capacities:
    """What is free now (bytes), cores and GPU: cheap to read, so never cached."""

    cores: int
    gpu: str | None
    device_free_bytes: int
    host_free_bytes: int
    disk_free_bytes: int


def measure_capacities(store: Path) -> Capacities:
    """Free GPU memory (or available RAM where the device tier is the CPU), available RAM, free
    bytes on the filesystem of ``store`` (its nearest existing folder), cores, the GPU's name."""
    host_free = int(psutil.virtual_memory().available)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        device_free, gpu = int(torch.cuda.mem_get_info(device)[0]), torch.cuda.get_device_name(device)
    else:
        device_free, gpu = host_free, None
    return Capacities(cpu_cores(), gpu, device_free, host_free, free_bytes(_existing_parent(store)))


def profile_of(capacities: Capacities, device_gbps: float, host_to_device_gbps: float, disk_read_gbps: float,
               disk_cold: bool) -> MachineProfile:  # fmt: skip
    """A profile from capacities read now and rates measured now or earlier (GB/s)."""
    return MachineProfile(**asdict(capacities), device_gbps=device_gbps, host_to_device_gbps=host_to_device_gbps,
                          disk_read_gbps=disk_read_gbps, disk_cold=disk_cold)  # fmt: skip


def measure_machine(store: Path, layout: BlockLayout, *, sample_bytes: int = 128 << 20) -> MachineProfile:
    """Measure this machine for blocks of ``layout`` with the store at ``store`` (its
    filesystem's free space and disk rate; scratch files go to a temporary folder beside it,
    removed after). ``sample_bytes``: payload moved per measurement (more: steadier)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scratch = Path(tempfile.mkdtemp(prefix=".hkv-tune-", dir=_existing_parent(store)))
    try:
        moves = measure_block_moves(sample_bytes, device, layout=layout, repeats=2, folder=scratch)
        disk = measure_disk(scratch / "disk", total_bytes=sample_bytes, layout=layout, repeats=1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return profile_of(measure_capacities(store), round(_device_copy_gbps(device, sample_bytes), 3), round(moves["h2d_gbps"], 3),
                      round(disk.disk_read_gbps, 3), disk.read_cache == "cold")  # fmt: skip
