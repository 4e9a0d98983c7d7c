"""Budgets for a run started without a config (``hkv demo``): `hkv tune`'s plan for this
machine and the requested context, from cheap measurements.

The plan is :func:`hkv.tune.plan.plan`, the same as `hkv tune`'s. What differs is only where its
inputs come from, so that a start costs about a second, not a benchmark:

- free capacities (GPU memory, RAM, disk at the store) and cores: read now (cheap);
- the rates (device copy, host -> device promotion, cold block reads): the ones `hkv tune` (or an
  earlier start) measured on this machine, for this filesystem and block size, if younger than a
  week (:mod:`hkv.tune.rates_cache`); else measured now with small probes (``probe_bytes`` each,
  about a second on a 2-core CPU at 16 MiB) and cached;
- the compute term: attention alone over the budget (milliseconds), not the model's step, which
  would take several forwards to time.

An existing store keeps its storage dtype (a store folder holds one block layout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blocks import DTYPE_NAMES, BlockLayout
from ..config import Config
from .compute import attention_step_ms
from .machine import MachineProfile, measure_capacities, measure_machine, profile_of
from .plan import ModelShape, TunePlan, plan, storage_dtype
from .rates_cache import CachedRates, cache_key, read_rates, write_rates

PROBE_BYTES = 16 << 20


@dataclass(slots=True)
class AutoPlan:
    """The plan, the machine it was made for, and where its figures came from."""

    plan: TunePlan
    machine: MachineProfile
    rates: CachedRates  # the rates used (``source``: "hkv tune" or "quick probe"; ``measured_at``)
    measured_now: bool  # the rates were measured by this call (no usable cached ones)
    compute_what: str  # what the compute term is

    def describe_rates(self) -> str:
        """One line: where the rates came from."""
        if self.measured_now:
            return f"rates measured now ({self.rates.sample_bytes >> 20} MiB probes; cached for the next start)"
        hours = self.rates.age_s() / 3600
        return f"rates from {self.rates.source}, measured {hours:.1f} h ago over {self.rates.sample_bytes >> 20} MiB (cached)"


def rates_of(machine: MachineProfile, sample_bytes: int, source: str, measured_at: float) -> CachedRates:
    return CachedRates(machine.device_gbps, machine.host_to_device_gbps, machine.disk_read_gbps, machine.disk_cold,
                       measured_at, sample_bytes, source)  # fmt: skip


def existing_dtype(store: Path) -> str | None:
    """The storage dtype of the block store at ``store`` (None when there is none)."""
    if not (Path(store) / "data.mdb").exists():
        return None
    from ..store.block_store import BlockStore

    with BlockStore.open_existing(Path(store)) as existing:
        return next(name for name, dtype in DTYPE_NAMES.items() if dtype == existing.layout.dtype)


def quick_machine(store: Path, layout: BlockLayout, *, probe_bytes: int = PROBE_BYTES,
                  cache: Path | None = None) -> tuple[MachineProfile, CachedRates, bool]:  # fmt: skip
    """This machine's profile for ``layout`` blocks at ``store``: capacities now, rates cached or
    probed (then cached). Returns (profile, rates used, whether they were measured now)."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    key = cache_key(device_type, store, layout.nbytes)
    cached = read_rates(key, path=cache)
    if cached is not None:
        profile = profile_of(measure_capacities(store), cached.device_gbps, cached.host_to_device_gbps, cached.disk_read_gbps,
                             cached.disk_cold)  # fmt: skip
        return profile, cached, False
    profile = measure_machine(store, layout, sample_bytes=probe_bytes)
    rates = rates_of(profile, probe_bytes, "quick probe", time.time())
    write_rates(key, rates, path=cache)
    return profile, rates, True


def auto_plan(shape: ModelShape, context: int, store: Path, *, base: Config | None = None, mode: str = "sparse",
              probe_bytes: int = PROBE_BYTES, cache: Path | None = None) -> AutoPlan:  # fmt: skip
    """`hkv tune`'s plan for ``context`` tokens of ``shape`` with the store at ``store``, from the
    cheap inputs of the module docstring. ConfigError (naming the bytes) when it cannot fit."""
    base = base if base is not None else Config.load(env={})
    dtype = existing_dtype(store) or storage_dtype(shape, mode)
    kv_dtype = shape.dtype if dtype == "auto" else DTYPE_NAMES[dtype]
    layout = BlockLayout(shape.kv_heads, base.attention.block_tokens, shape.head_dim, kv_dtype)
    machine, rates, measured_now = quick_machine(store, layout, probe_bytes=probe_bytes, cache=cache)
    tokens = min(base.attention.budget_tokens if mode == "sparse" else context, context)
    device = torch.device("cuda" if machine.gpu else "cpu")
    compute_ms = attention_step_ms(shape, tokens, device)
    result = plan(shape, context, machine, store=store, mode=mode, compute_ms=compute_ms, base=base, dtype=dtype)
    return AutoPlan(result, machine, rates, measured_now, f"attention alone over {tokens} tokens (quick; `hkv tune` times the model)")
