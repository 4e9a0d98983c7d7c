"""``hkv demo`` without ``--config``: tier budgets, encodings and prefetch from `hkv tune`'s plan
for this machine and the demo's context (:mod:`hkv.tune.auto`), and the lines that say what was
chosen and from which figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from .common import human_bytes
from .demo import read_record

ROOM_TOKENS = 1024  # beyond the prompt: the answer and later follow-up turns of the session


def demo_context(config: Config, name: str, tokens: int) -> int:
    """Tokens to plan for: the prompt (or the saved session's first prompt, if longer) plus room."""
    saved = read_record(config, name).get("prefill_tokens")
    return max(tokens, saved if isinstance(saved, int) else 0) + ROOM_TOKENS


def auto_demo_config(model: Any, config: Config, *, name: str, tokens: int, cache: Path | None = None) -> tuple[Config, list[str]]:
    """``config`` (defaults, ``--store``, HKV_* variables) with the plan's budgets, storage dtype,
    encodings, positions and prefetch; HKV_* variables still win. Returns it and the lines to
    print. ConfigError when the context cannot fit this machine."""
    from ..tune.auto import auto_plan
    from ..tune.plan import ModelShape

    context = demo_context(config, name, tokens)
    auto = auto_plan(ModelShape.of(model), context, Path(config.tiers.path), base=config, cache=cache)
    chosen = Config.load(auto.plan.config)  # the environment over the plan, as over a file
    tiers, step, machine = chosen.tiers, auto.plan.prediction, auto.machine
    prefetch = f"on, {chosen.prefetch.workers} workers" if chosen.prefetch.enabled else "off"
    lines = [
        f"no --config: budgets from hkv tune's plan for {context} tokens on this machine ({machine.cores} cores, "
        f"GPU {machine.gpu or 'none'}; {auto.describe_rates()})",
        f"  free now: device {human_bytes(machine.device_free_bytes)}, RAM {human_bytes(machine.host_free_bytes)}, "
        f"disk {human_bytes(machine.disk_free_bytes)}",
        f"  tiers: device {human_bytes(int(tiers.device))}, host {human_bytes(int(tiers.host))} ({tiers.host_encoding}), "
        f"disk {human_bytes(int(tiers.disk))} ({tiers.disk_encoding}); blocks {tiers.dtype}; positions "
        f"{chosen.attention.positions}; prefetch {prefetch}",
        f"  predicted decode step {step.total_ms} ms, bound by {step.bound} (compute: {auto.compute_what})",
    ]
    return chosen, lines + [f"  note: {note}" for note in auto.plan.notes]
