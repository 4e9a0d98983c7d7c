"""Lossy block encodings for the disk tier: int8 and int4, vectorised torch on any device.

A block is ``[2, kv_heads, block_tokens, head_dim]`` (keys, values). Keys vary most from channel
to channel (a few channels carry large magnitudes after RoPE), values from token to token, so,
as in KIVI, keys are quantized per channel (one group per ``(head, dim)`` over the block's
tokens) and values per token (one group per ``(head, token)`` over ``head_dim``):

- ``int8``: symmetric, ``q = round(x / s)`` in [-127, 127], one fp16 scale ``s = max|x| / 127``
  per group. Error per element <= s / 2 (plus fp16 rounding of the scale).
- ``int4``: affine, ``q = round(x / s) + z`` in [0, 15], one fp16 scale ``s = (hi - lo) / 15``
  and one uint8 zero point ``z = round(-lo / s)`` per group, where ``lo = min(min x, 0)`` and
  ``hi = max(max x, 0)`` (the range holds 0, so ``z`` is in [0, 15]); two codes per byte (low
  nibble first). Error per element <= s / 2 (plus fp16 rounding).

Payload layout (little-endian, one block; ``G = kv_heads * head_dim`` key groups and
``kv_heads * block_tokens`` value groups): the codes of the keys then of the values
(``[kv_heads, block_tokens, head_dim]`` order, int8: one byte each; int4: packed), then the key
scales ``[kv_heads, head_dim]`` and value scales ``[kv_heads, block_tokens]`` (fp16), then for
int4 the key and value zero points (uint8, same shapes). For SmolLM2's layout (3 KV heads, 64
tokens, head dim 64) a record is 0.516x (int8) and 0.274x (int4) of an fp16 record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ENCODINGS = ("none", "int8", "int4")
CODES = {"none": 0, "int8": 1, "int4": 2}  # the record header's encoding byte
NAMES = {code: name for name, code in CODES.items()}


@dataclass(frozen=True, slots=True)
class EncodedShape:
    """Byte sizes of one encoded block of shape ``[2, H, T, D]``."""

    encoding: str
    heads: int
    tokens: int
    dim: int

    @property
    def codes_nbytes(self) -> int:
        elements = 2 * self.heads * self.tokens * self.dim
        return elements if self.encoding == "int8" else (elements + 1) // 2

    @property
    def groups(self) -> tuple[int, int]:
        """(key groups, value groups)."""
        return self.heads * self.dim, self.heads * self.tokens

    @property
    def nbytes(self) -> int:
        """Payload bytes: codes, fp16 scales, and for int4 the uint8 zero points."""
        groups = sum(self.groups)
        return self.codes_nbytes + 2 * groups + (groups if self.encoding == "int4" else 0)


def encoded_nbytes(encoding: str, shape: tuple[int, int, int, int], itemsize: int) -> int:
    """Payload bytes of one block ``shape`` (``[2, H, T, D]``) under ``encoding`` (``itemsize``:
    bytes per element of the raw dtype, for ``"none"``)."""
    _, heads, tokens, dim = shape
    if encoding == "none":
        return 2 * heads * tokens * dim * itemsize
    return EncodedShape(encoding, heads, tokens, dim).nbytes


def _groups_last(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys as ``[n, H, D, T]`` (a channel's tokens last) and values as ``[n, H, T, D]``, fp32."""
    keys, values = blocks[:, 0].float(), blocks[:, 1].float()
    return keys.transpose(-1, -2), values


def encode(blocks: torch.Tensor, encoding: str) -> torch.Tensor:
    """Encode ``blocks`` ``[n, 2, H, T, D]`` (any float dtype, any device): ``[n, payload
    bytes]`` uint8 on the same device, one row per block in the layout of the module docstring."""
    n, _, heads, tokens, dim = blocks.shape
    keys, values = _groups_last(blocks)
    rows = []
    if encoding == "int8":
        scales = []
        codes = []
        for x in (keys, values):
            scale = (x.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16).float()
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
            codes.append(q)
            scales.append(scale.squeeze(-1).to(torch.float16))
        key_codes = codes[0].transpose(-1, -2)  # back to [n, H, T, D]
        rows = [key_codes.reshape(n, -1).view(torch.uint8), codes[1].reshape(n, -1).view(torch.uint8)]
        rows += [scale.reshape(n, -1).view(torch.uint8) for scale in scales]
    elif encoding == "int4":
        scales, zeros, codes = [], [], []
        for x in (keys, values):
            lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
            hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
            scale = ((hi - lo) / 15).to(torch.float16).float()
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = torch.round(-lo / safe).clamp_(0, 15)
            q = (torch.round(x / safe) + zero).clamp_(0, 15).to(torch.uint8)
            codes.append(q)
            scales.append(scale.squeeze(-1).to(torch.float16))
            zeros.append(zero.squeeze(-1).to(torch.uint8))
        flat = torch.cat([codes[0].transpose(-1, -2).reshape(n, -1), codes[1].reshape(n, -1)], dim=1)
        if flat.shape[1] % 2:
            flat = torch.nn.functional.pad(flat, (0, 1))
        packed = flat[:, 0::2] | (flat[:, 1::2] << 4)
        rows = [packed] + [scale.reshape(n, -1).view(torch.uint8) for scale in scales]
        rows += [zero.reshape(n, -1) for zero in zeros]
    else:
        raise ValueError(f"unknown lossy encoding {encoding!r} (one of int8, int4)")
    out = torch.cat([row.contiguous() for row in rows], dim=1)
    assert out.shape[1] == EncodedShape(encoding, heads, tokens, dim).nbytes
    return out


def decode(payload: torch.Tensor, encoding: str, out: torch.Tensor) -> None:
    """Decode ``payload`` ``[n, payload bytes]`` uint8 into ``out`` ``[n, 2, H, T, D]`` (its
    dtype and device; ``payload`` on the same device)."""
    n, _, heads, tokens, dim = out.shape
    shape = EncodedShape(encoding, heads, tokens, dim)
    key_groups, value_groups = shape.groups
    elements = heads * tokens * dim
    codes_end = shape.codes_nbytes
    scales = payload[:, codes_end : codes_end + 2 * (key_groups + value_groups)].contiguous().view(torch.float16).float()
    key_scale = scales[:, :key_groups].reshape(n, heads, 1, dim)
    value_scale = scales[:, key_groups:].reshape(n, heads, tokens, 1)
    if encoding == "int8":
        q = payload[:, :codes_end].contiguous().view(torch.int8).float()
        keys = q[:, :elements].reshape(n, heads, tokens, dim) * key_scale
        values = q[:, elements:].reshape(n, heads, tokens, dim) * value_scale
    elif encoding == "int4":
        packed = payload[:, :codes_end]
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, -1)[:, : 2 * elements].float()
        zeros = payload[:, codes_end + 2 * (key_groups + value_groups) :].float()
        key_zero = zeros[:, :key_groups].reshape(n, heads, 1, dim)
        value_zero = zeros[:, key_groups:].reshape(n, heads, tokens, 1)
        keys = (q[:, :elements].reshape(n, heads, tokens, dim) - key_zero) * key_scale
        values = (q[:, elements:].reshape(n, heads, tokens, dim) - value_zero) * value_scale
    else:
        raise ValueError(f"unknown lossy encoding {encoding!r} (one of int8, int4)")
    out[:, 0].copy_(keys)
    out[:, 1].copy_(values)
