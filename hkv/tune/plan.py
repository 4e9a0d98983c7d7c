"""`hkv tune`'s plan: tier budgets, encoding and prefetch for a model shape and a context length
on a measured machine, and the decode step time its cost model predicts (docs/tuning.md).

Cost model of one decode step (sparse attention, ``B`` = ``budget_tokens``, ``T`` =
``block_tokens``, ``L`` layers; exact attention reads every block instead of ``B / T``):

- each layer scores every block's summary on the device: ``summaries bytes / device GB/s``;
- each layer reads ``B / T`` blocks, of which ``(sink + local) / T`` are pinned on the device.
  The others are taken to be spread like the KV itself (a pessimistic, uniform selection; real
  selections change little from step to step, and the prefetcher fetches ahead): a fraction
  ``f_dev`` is already on the device, ``f_host`` comes from host RAM at the measured
  host -> device rate, ``f_disk`` from disk at the measured cold block-read rate (encoded
  records: fewer bytes);
- compute: the model's own step over ``B`` tokens of attention (measured with transformers'
  DynamicCache at that length; for a bare shape, attention alone).

Step = summaries + compute + moves without prefetch; summaries + max(compute, moves) with it
(the moves of a layer overlap the compute of the layers before). What bounds the step is the
largest of compute, summaries, host moves and disk moves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..blocks import DTYPE_NAMES, BlockLayout
from ..config import Config, ConfigError, prefetch_pays
from .machine import MachineProfile

SLACK_BYTES = 64 << 20  # disk: room beyond the encoded KV (session tails, freelist)
TIERS = ("device", "host", "disk")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the plan needs of a model: its attention shape, KV dtype and trained length in tokens
    (``max_position_embeddings``; None when unknown)."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    trained_tokens: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelShape:
        """``"layers=30,q_heads=9,kv_heads=3,head_dim=64,dtype=float16,trained_tokens=8192"``
        (dtype and trained_tokens optional)."""
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name == "dtype":
                if value not in DTYPE_NAMES:
                    raise ValueError(f"dtype = {value!r}: one of {', '.join(DTYPE_NAMES)}")
                fields["dtype"] = DTYPE_NAMES[value]
            elif name in ("layers", "q_heads", "kv_heads", "head_dim", "trained_tokens") and value.isdigit() and int(value) > 0:
                fields[name] = int(value)
            else:
                raise ValueError(f"{part!r}: expected layers=N, q_heads=N, kv_heads=N, head_dim=N, dtype=float16|bfloat16|float32, "
                                 "trained_tokens=N")
        missing = {"layers", "q_heads", "kv_heads", "head_dim"} - set(fields)
        if missing:
            raise ValueError(f"model shape {text!r} lacks {', '.join(sorted(missing))}")
        return cls(**fields)

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        trained = getattr(c, "max_position_embeddings", None)
        return cls(c.num_hidden_layers, c.num_attention_heads, kv_heads, head_dim, next(model.parameters()).dtype, trained)


@dataclass(slots=True)
class StepPrediction:
    """Predicted decode step, in milliseconds, and blocks read per step from each tier."""

    compute_ms: float
    summaries_ms: float
    host_ms: float
    disk_ms: float
    total_ms: float
    bound: str  # "compute", "summaries", "host" or "disk"
    blocks: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class TunePlan:
    """The config `hkv tune` writes, what each tier holds of the context, and the prediction."""

    config: Config
    context: int
    shape: ModelShape
    kv_bytes: int  # the context's KV in the storage dtype
    summary_bytes: int  # its block summaries (always on the device)
    tier_bytes: dict[str, int]  # what each tier will hold of the context (disk: encoded, everything)
    prediction: StepPrediction
    storage_dtype: str = "float16"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.as_dict(), "context": self.context,
            "shape": {**asdict(self.shape), "dtype": str(self.shape.dtype).removeprefix("torch.")},
            "kv_bytes": self.kv_bytes, "summary_bytes": self.summary_bytes, "tier_bytes": self.tier_bytes,
            "prediction": asdict(self.prediction), "storage_dtype": self.storage_dtype, "notes": self.notes,
        }  # fmt: skip


def _predict(config: Config, shape: ModelShape, layout: BlockLayout, context: int, machine: MachineProfile,
             compute_ms: float) -> StepPrediction:  # fmt: skip
    attention, tiers = config.attention, config.tiers
    per_layer = math.ceil(context / layout.block_tokens)
    summaries = shape.layers * per_layer * 2 * shape.kv_heads * shape.head_dim * 4
    pinned = min(per_layer, (attention.sink_tokens + attention.local_tokens) // layout.block_tokens)
    if attention.mode == "exact":
        chosen, summaries = per_layer - pinned, 0
    else:
        chosen = max(0, min(per_layer, attention.budget_tokens // layout.block_tokens) - pinned)
    others = max(1, per_layer - pinned)  # the blocks a selection picks among
    device_blocks = int(tiers.device) // layout.nbytes // shape.layers - pinned
    host_blocks = int(tiers.host) // layout.nbytes // shape.layers
    f_dev = min(1.0, max(0, device_blocks) / others)
    f_host = min(1.0 - f_dev, host_blocks / others)
    f_disk = max(0.0, 1.0 - f_dev - f_host)
    blocks = {name: shape.layers * chosen * f for name, f in (("device", f_dev), ("host", f_host), ("disk", f_disk))}
    blocks["device"] += shape.layers * pinned
    record = layout.encoded_record_nbytes(tiers.disk_encoding)
    # Without a GPU a raw host tier is rows of the device's tensor: with no block on disk, a step
    # reads host blocks in place as it reads device ones (in the compute term), copying nothing.
    in_place = machine.gpu is None and tiers.host_encoding == "none" and f_disk == 0
    parts = {
        "compute": compute_ms,
        "summaries": summaries / (machine.device_gbps * 1e9) * 1e3,
        "host": 0.0 if in_place else blocks["host"] * layout.nbytes / (machine.host_to_device_gbps * 1e9) * 1e3,
        "disk": blocks["disk"] * record / (machine.disk_read_gbps * 1e9) * 1e3,
    }
    moves = parts["host"] + parts["disk"]
    total = parts["summaries"] + (max(compute_ms, moves) if config.prefetch.on(machine.gpu is not None, machine.cores) else compute_ms + moves)
    return StepPrediction(
        compute_ms=round(compute_ms, 2), summaries_ms=round(parts["summaries"], 2), host_ms=round(parts["host"], 2),
        disk_ms=round(parts["disk"], 2), total_ms=round(total, 2), bound=max(parts, key=parts.get),
        blocks={name: round(count, 1) for name, count in blocks.items()},
    )  # fmt: skip


def predict_step(config: Config, shape: ModelShape, context: int, machine: MachineProfile, compute_ms: float) -> StepPrediction:
    """The cost model's decode step for ``config`` (any config, e.g. one a user wrote)."""
    return _predict(config, shape, _layout(config, shape), context, machine, compute_ms)


def storage_dtype(shape: ModelShape, mode: str) -> str:
    """``tiers.dtype`` the plan picks: float16 for a float32 model in sparse mode, else the model's own."""
    return "auto" if mode == "exact" or shape.dtype != torch.float32 else "float16"


def _layout(config: Config, shape: ModelShape) -> BlockLayout:
    dtype = shape.dtype if config.tiers.dtype == "auto" else DTYPE_NAMES[config.tiers.dtype]
    return BlockLayout(shape.kv_heads, config.attention.block_tokens, shape.head_dim, dtype)


def plan(shape: ModelShape, context: int, machine: MachineProfile, *, store: Path, mode: str = "sparse",
         compute_ms: float, base: Config | None = None, dtype: str | None = None) -> TunePlan:  # fmt: skip
    """Budgets for ``context`` tokens of ``shape`` on ``machine``: the device tier holds the pinned
    blocks, the step's working set and what else fits in half its free memory (less the
    summaries); host RAM the next part, within half of what is available (a third where the
    device tier is RAM too); the disk every block (sessions write them all through), in the
    lightest encoding that fits 90% of its free space (sparse only). ConfigError when the
    context cannot fit. ``dtype``: the storage dtype to keep (an existing store's), else chosen."""
    base = base if base is not None else Config.load(env={})
    notes: list[str] = []
    if dtype is None:
        dtype = storage_dtype(shape, mode)
    elif dtype != storage_dtype(shape, mode):
        notes.append(f"KV stored in {dtype}, as the existing store at {store} holds it")
    if dtype == "float16" and shape.dtype == torch.float32:
        notes.append("KV stored in float16 (the model computes in float32; sparse attention tolerates it, exact would not)")
    attention = {**base.attention.model_dump(), "mode": mode}
    if mode == "sparse" and shape.trained_tokens is not None and context > shape.trained_tokens:
        attention["positions"] = "remap"
        notes.append(f"positions remapped: {context} tokens are beyond the model's trained {shape.trained_tokens} (docs/positions.md)")
    config = Config.load(base, env={}, tiers={"dtype": dtype, "path": str(store), "disk_encoding": "none"}, attention=attention)
    layout = _layout(config, shape)
    per_layer = math.ceil(context / layout.block_tokens)
    n_blocks = shape.layers * per_layer
    kv = n_blocks * layout.nbytes
    summaries = n_blocks * 2 * shape.kv_heads * shape.head_dim * 4
    pinned = min(per_layer, (config.attention.sink_tokens + config.attention.local_tokens) // layout.block_tokens)
    working = shape.layers * (pinned + config.attention.budget_tokens // layout.block_tokens) * layout.nbytes
    on_cpu = machine.gpu is None
    device_room = int(machine.device_free_bytes * (0.25 if on_cpu else 0.5)) - summaries
    if device_room < working:
        raise ConfigError(
            f"the device has {machine.device_free_bytes} bytes free: too little for the summaries of {context} tokens "
            f"({summaries} bytes) and a step's blocks ({working} bytes); shorten the context or lower attention.budget_tokens"
        )
    device = min(kv, max(working * 2, device_room))
    host = max(layout.nbytes, min(kv - device, int(machine.host_free_bytes * (0.33 if on_cpu else 0.5))))
    encodings = ("none",) if mode == "exact" else ("none", "int8", "int4")
    disk_room = int(machine.disk_free_bytes * 0.9)
    for encoding in encodings:
        disk = n_blocks * layout.encoded_record_nbytes(encoding) + SLACK_BYTES
        if disk <= disk_room:
            break
    else:
        raise ConfigError(
            f"{context} tokens need {disk} bytes on disk even as {encodings[-1]}; the filesystem of {store} has "
            f"{machine.disk_free_bytes} bytes free"
        )
    if encoding != "none":
        notes.append(f"disk blocks stored as {encoding}: the raw KV ({kv} bytes) does not fit 90% of the free disk")
    prefetch = prefetch_pays(machine.gpu is not None, machine.cores)
    if not prefetch:
        notes.append(f"prefetch off: on {machine.cores} cores its threads compete with the model for the CPU (docs/benchmarks.md)")
    config = Config.load(
        config, env={}, tiers={"device": device, "host": host, "disk": disk, "disk_encoding": encoding},
        prefetch={"enabled": prefetch, "workers": max(1, min(4, machine.cores // 2))},
    )  # fmt: skip
    prediction = _predict(config, shape, layout, context, machine, compute_ms)
    held = {"device": min(kv, device), "host": min(max(0, kv - device), host), "disk": n_blocks * layout.encoded_record_nbytes(encoding)}
    return TunePlan(config, context, shape, kv, summaries, held, prediction, str(layout.dtype).removeprefix("torch."), notes)
