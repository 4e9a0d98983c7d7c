"""The rates `hkv tune` measured, kept on disk so that later starts (``hkv demo`` without a
config) reuse them instead of measuring again.

One JSON file (``$XDG_CACHE_HOME/hkv/rates.json``, else ``~/.cache/hkv/rates.json``; never
pickled), one entry per (device type, filesystem of the store, block bytes): the rates in GB/s,
whether the disk reads were cold, when and over how many bytes they were measured. Free
capacities are never cached: they change from one start to the next. A file that does not parse
or an entry of the wrong form is treated as absent (and overwritten by the next measurement).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MAX_AGE_S = 7 * 24 * 3600  # older rates are measured again


@dataclass(frozen=True, slots=True)
class CachedRates:
    """Rates of one machine / filesystem / block size (GB/s = 1e9 B/s), measured at ``measured_at``
    (Unix seconds) over ``sample_bytes`` per figure, by ``source`` ("hkv tune" or "quick probe")."""

    device_gbps: float
    host_to_device_gbps: float
    disk_read_gbps: float
    disk_cold: bool
    measured_at: float
    sample_bytes: int
    source: str

    def age_s(self) -> float:
        return time.time() - self.measured_at


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hkv" / "rates.json"


def cache_key(device_type: str, store: Path, block_bytes: int) -> str:
    """``"cpu|fs=2049|block=49152"``: rates hold for one device type, the filesystem of ``store``
    (its nearest existing folder) and one block size."""
    path = Path(os.path.abspath(store))
    while not path.exists() and path != path.parent:
        path = path.parent
    return f"{device_type}|fs={path.stat().st_dev}|block={block_bytes}"


def _entries(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def read_rates(key: str, *, path: Path | None = None, max_age_s: float = MAX_AGE_S) -> CachedRates | None:
    """The cached rates under ``key`` if present, well formed and younger than ``max_age_s``."""
    entry = _entries(path or cache_path()).get(key)
    try:
        rates = CachedRates(**entry) if isinstance(entry, dict) else None
    except TypeError:
        return None
    if rates is None or not all(isinstance(v, (int, float)) and v > 0 for v in (rates.device_gbps, rates.host_to_device_gbps, rates.disk_read_gbps)):
        return None
    return rates if rates.age_s() <= max_age_s else None


def write_rates(key: str, rates: CachedRates, *, path: Path | None = None) -> None:
    """Store ``rates`` under ``key`` (other entries kept); a cache that cannot be written is skipped."""
    path = path or cache_path()
    entries = _entries(path)
    entries[key] = asdict(rates)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"entries": entries}, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the next start measures again
