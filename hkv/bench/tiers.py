"""``hkv bench tiers``: block moves between host and device, and disk-tier I/O, against baselines.

Host <-> device: ``move_bytes`` of SmolLM2-shaped blocks (3 KV heads x 64 tokens x 64 dims,
fp16 = 48 KiB) go through a :class:`~hkv.tiers.manager.TierManager` -- ``demote`` (device ->
host) and ``promote`` (host -> device), bookkeeping included -- and are compared with one plain
``copy_`` of the same bytes between the manager's own host pool (pinned on CUDA) and device
pool tensors, interleaved in the same run. Each figure is the median of ``repeats`` runs after a
warm-up round (a best-of picks the plain copy's lucky outliers on a shared VM). Without a GPU
the "device" is the CPU and both figures are memory-to-memory copies.

Disk: :func:`hkv.bench.disk.measure_disk` (the disk tier's reads and writes of the same blocks
against raw sequential file I/O; see that module for how the figures are made cold and durable).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..blocks import BlockKey, BlockLayout
from ..config import Config
from ..tiers.manager import TierManager
from .disk import measure_disk

SMOL_LAYOUT = BlockLayout(kv_heads=3, block_tokens=64, head_dim=64, dtype=torch.float16)  # 48 KiB
DISK_KEYS = ("disk_read_gbps", "disk_cache_read_gbps", "disk_write_gbps", "raw_disk_read_gbps", "raw_disk_write_gbps", "raw_random_read_gbps",
             "disk_lmdb_read_gbps", "disk_lmdb_write_gbps")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def measure_block_moves(
    nbytes: int, device: torch.device, *, layout: BlockLayout = SMOL_LAYOUT, repeats: int = 3, folder: Path | None = None
) -> dict[str, float]:
    """Block moves through a TierManager against plain copies of the same bytes, in GB/s.

    Each repeat puts the blocks on the device (untimed), demotes them all to host (timed:
    ``d2h_gbps``), promotes them all back (timed: ``h2d_gbps``) and deletes them; then one
    ``copy_`` between the manager's own host and device pool tensors, each way (``plain_h2d_gbps``,
    ``plain_d2h_gbps``: same bytes, same memory, pinned on CUDA). Median of ``repeats``, interleaved,
    after one warm-up round.
    """
    n = max(1, nbytes // layout.nbytes)
    moved = n * layout.nbytes
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="hkv-bench-moves-")) if own else folder
    config = Config(tiers={"device": moved, "host": moved, "disk": 64 * layout.record_nbytes, "path": str(folder / "store")})
    keys = [BlockKey(i.to_bytes(16, "little")) for i in range(n)]
    data = torch.randn((n, *layout.shape), device=device).to(layout.dtype)
    times: dict[str, list[float]] = {"h2d": [], "d2h": [], "plain_h2d": [], "plain_d2h": []}

    def timed(name: str, action) -> None:
        _sync(device)
        start = time.perf_counter()
        action()
        _sync(device)
        times[name].append(time.perf_counter() - start)

    try:
        with TierManager(config, layout, device=device) as manager:
            for _ in range(repeats + 1):  # the first round warms up (page faults, allocator)
                manager.put_many(keys, data)
                timed("d2h", lambda: manager.demote(keys, to="host"))
                timed("h2d", lambda: manager.promote(keys, to="device"))
                if manager.where(keys[-1]) != {"device", "host"}:
                    raise RuntimeError(f"bench: blocks did not move as planned: {sorted(manager.where(keys[-1]))}")
                manager.delete(keys)
                host, dev = manager.host_pool.data, manager.device_pool.data
                timed("plain_h2d", lambda: dev.copy_(host, non_blocking=True))
                timed("plain_d2h", lambda: host.copy_(dev, non_blocking=True))
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)
    return {f"{name}_gbps": _gbps(moved, statistics.median(values[1:])) for name, values in times.items()} | {"blocks": n}


def _disk_figures(folder: Path, disk_bytes: int) -> dict[str, Any]:
    raw = measure_disk(folder, total_bytes=disk_bytes).as_dict()
    # The headline keys stay as they are; the disk run's setup gets a ``disk_`` prefix.
    return {key if key in DISK_KEYS or key == "read_cache" else f"disk_{key}": value for key, value in raw.items()}


def run_tiers_bench(
    config: Config | None = None, *, move_bytes: int = 256 * 2**20, disk_bytes: int = 1 << 30, repeats: int = 3,
    device: torch.device | str | None = None, disk: bool = True, layout: BlockLayout = SMOL_LAYOUT,
) -> dict[str, Any]:  # fmt: skip
    """Run the tiers benchmark; returns the figures (GB/s = 1e9 bytes/s) as a JSON-ready dict.

    Keys: ``h2d_gbps``, ``d2h_gbps`` (block moves through the manager), ``memcpy_gbps`` (one
    plain host -> device ``copy_`` of the same bytes), ``plain_d2h_gbps`` (the same, device -> host), ``h2d_ratio``,
    ``d2h_ratio``, ``disk_*`` and ``raw_disk_*`` (from :mod:`hkv.bench.disk`), ``disk_read_ratio``,
    ``disk_write_ratio``, and the setup (``device``, ``block_bytes``, ``blocks``, ``move_bytes``).
    The disk files go in a temporary folder beside ``config.tiers.path`` (the store's disk).
    """
    config = config or Config()
    if device is None:
        device = "cuda" if config.tiers.accelerator == "auto" and torch.cuda.is_available() else (
            "cpu" if config.tiers.accelerator == "auto" else config.tiers.accelerator)  # fmt: skip
    device = torch.device(device)
    base = Path(config.tiers.path).resolve().parent
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="hkv-bench-", dir=base))
    try:
        moves = measure_block_moves(move_bytes, device, layout=layout, repeats=repeats, folder=folder)
        h2d, d2h, blocks = moves["h2d_gbps"], moves["d2h_gbps"], moves["blocks"]
        plain_h2d, plain_d2h = moves["plain_h2d_gbps"], moves["plain_d2h_gbps"]
        figures: dict[str, Any] = {
            "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
            "block_bytes": layout.nbytes,
            "blocks": blocks,
            "move_bytes": blocks * layout.nbytes,
            "h2d_gbps": h2d,
            "d2h_gbps": d2h,
            "memcpy_gbps": plain_h2d,
            "plain_d2h_gbps": plain_d2h,
            "h2d_ratio": h2d / plain_h2d,
            "d2h_ratio": d2h / plain_d2h,
        }
        if disk:
            figures.update(_disk_figures(folder / "disk", disk_bytes))
        else:
            figures.update(dict.fromkeys(DISK_KEYS))
        for ratio, tier, raw in (("disk_read_ratio", "disk_read_gbps", "raw_disk_read_gbps"),
                                 ("disk_random_read_ratio", "disk_read_gbps", "raw_random_read_gbps"),
                                 ("disk_cache_read_ratio", "disk_cache_read_gbps", "raw_random_read_gbps"),
                                 ("disk_lmdb_read_ratio", "disk_lmdb_read_gbps", "raw_random_read_gbps"),
                                 ("disk_write_ratio", "disk_write_gbps", "raw_disk_write_gbps"),
                                 ("disk_lmdb_write_ratio", "disk_lmdb_write_gbps", "raw_disk_write_gbps")):  # fmt: skip
            ours, plain = figures.get(tier), figures.get(raw)
            figures[ratio] = ours / plain if ours and plain else None
        return figures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_ROWS = (
    ("host -> device, block moves", "h2d_gbps", "memcpy_gbps", "h2d_ratio", 0.7),
    ("device -> host, block moves", "d2h_gbps", "plain_d2h_gbps", "d2h_ratio", 0.7),
    ("disk reads vs raw random O_DIRECT", "disk_read_gbps", "raw_random_read_gbps", "disk_random_read_ratio", 0.7),
    ("  the same, aio_reads = false", "disk_cache_read_gbps", "raw_random_read_gbps", "disk_cache_read_ratio", 0.7),
    ("  the same, segments = false", "disk_lmdb_read_gbps", "raw_random_read_gbps", "disk_lmdb_read_ratio", 0.7),
    ("disk reads vs raw sequential", "disk_read_gbps", "raw_disk_read_gbps", "disk_read_ratio", 0.5),
    ("disk writes vs raw O_DIRECT + fsync", "disk_write_gbps", "raw_disk_write_gbps", "disk_write_ratio", 0.6),
    ("  the same, segments = false", "disk_lmdb_write_gbps", "raw_disk_write_gbps", "disk_lmdb_write_ratio", 0.6),
)


def format_table(result: dict[str, Any]) -> str:
    """The figures as a plain-text table: hkv vs the baseline of the same run, ratio and target."""

    def num(value: Any, width: int, fmt: str) -> str:
        return ("n/a" if value is None else format(value, fmt)).rjust(width)

    head = f"hkv bench tiers on {result.get('device')}: {result.get('blocks')} blocks of {result.get('block_bytes')} bytes"
    lines = [head, f"{'measure':34} {'hkv GB/s':>9} {'plain GB/s':>11} {'ratio':>6} {'target':>7}"]
    for label, ours, plain, ratio, target in _ROWS:
        value = result.get(ratio)
        mark = "" if value is None else (" ok" if value >= target else " LOW")
        cells = f"{num(result.get(ours), 9, '.2f')} {num(result.get(plain), 11, '.2f')} {num(value, 6, '.2f')}"
        lines.append(f"{label:34} {cells} {'>= ' + format(target, '.0%'):>7}{mark}")
    if result.get("disk_raw_buffered_write_gbps") is not None and result.get("disk_write_gbps") is not None:
        buffered = result["disk_raw_buffered_write_gbps"]
        lines.append(
            f"disk writes vs a raw write through the page cache + fsync ({buffered:.2f} GB/s, the path LMDB takes): "
            f"{result['disk_write_gbps'] / buffered:.2f}"
        )
    for key in ("read_cache", "disk_error"):
        if result.get(key) is not None:
            lines.append(f"{key}: {result[key]}")
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    print(format_table(result))
