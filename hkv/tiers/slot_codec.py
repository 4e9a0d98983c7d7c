"""How a slot pool stores a block: raw, or encoded (``tiers.host_encoding``).

A raw slot is the block itself, ``[2, kv_heads, block_tokens, head_dim]`` in the layout's
dtype. An encoded slot is one row of :func:`hkv.encoding.encode`'s payload, ``[payload bytes]``
uint8 with the scales (and int4's zero points) inside it, so the pool's budget counts encoded
bytes and holds about 1.9x (int8) or 3.6x (int4) more fp16 blocks. Pools hand raw blocks in
and out; :class:`SlotCodec` is the one place that turns one into the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import BlockLayout
from ..encoding import ENCODINGS, EncodedShape, decode, encode


@dataclass(frozen=True, slots=True)
class SlotCodec:
    """The slot format of a pool of ``layout`` blocks under ``encoding`` (``"none"``, ``"int8"``, ``"int4"``)."""

    layout: BlockLayout
    encoding: str = "none"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding = {self.encoding!r}: one of {', '.join(ENCODINGS)}")

    @property
    def lossy(self) -> bool:
        return self.encoding != "none"

    @property
    def slot_shape(self) -> tuple[int, ...]:
        """One slot: the block's shape, or ``(payload bytes,)`` when encoded."""
        if not self.lossy:
            return self.layout.shape
        _, heads, tokens, dim = self.layout.shape
        return (EncodedShape(self.encoding, heads, tokens, dim).nbytes,)

    @property
    def slot_dtype(self) -> torch.dtype:
        return torch.uint8 if self.lossy else self.layout.dtype

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot (what a budget is divided by)."""
        if not self.lossy:
            return self.layout.nbytes
        return self.slot_shape[0]

    def encode(self, blocks: torch.Tensor) -> torch.Tensor:
        """``blocks`` ``[n, *layout.shape]`` -> slots ``[n, *slot_shape]`` on the same device
        (``blocks`` itself when raw)."""
        return encode(blocks, self.encoding) if self.lossy else blocks

    def decode_into(self, slots: torch.Tensor, out: torch.Tensor) -> None:
        """Slots ``[n, *slot_shape]`` -> ``out`` ``[n, *layout.shape]`` (both on one device)."""
        if self.lossy:
            decode(slots, self.encoding, out)
        else:
            out.copy_(slots)

    def decode(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots ``[n, *slot_shape]`` -> a new tensor of blocks ``[n, *layout.shape]`` on their device."""
        out = torch.empty((len(slots), *self.layout.shape), dtype=self.layout.dtype, device=slots.device)
        self.decode_into(slots, out)
        return out
