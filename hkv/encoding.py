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


def encode(blocks: torch.Tensor, encoding: str) -> torch.Tensor:
    """Encode ``blocks`` ``[n, 2, H, T, D]`` (any float dtype, any device): ``[n, payload
    bytes]`` uint8 on the same device, one row per block in the layout of the module docstring."""
    if encoding not in ("int8", "int4"):
        raise ValueError(f"unknown lossy encoding {encoding!r} (one of int8, int4)")
    n, _, heads, tokens, dim = blocks.shape
    x = blocks.float()
    # Keys per channel (reduced over the tokens, dim -2), values per token (over head_dim, dim -1),
    # both computed in the blocks' own [H, T, D] order: contiguous passes, no transposes.
    codes = torch.empty((n, 2, heads, tokens, dim), dtype=torch.int8 if encoding == "int8" else torch.uint8, device=x.device)
    scales, zeros = [], []
    for part, reduced in ((0, -2), (1, -1)):
        v = x[:, part]
        if encoding == "int8":
            scale = (v.abs().amax(dim=reduced, keepdim=True) / 127).to(torch.float16).float()
            safe = torch.where(scale > 0, scale, 1.0)
            codes[:, part] = torch.div(v, safe).round_().clamp_(-127, 127)
        else:
            lo = v.amin(dim=reduced, keepdim=True).clamp_(max=0)  # amin and amax: torch.aminmax is 10x slower here
            hi = v.amax(dim=reduced, keepdim=True).clamp_(min=0)
            scale = ((hi - lo) / 15).to(torch.float16).float()
            safe = torch.where(scale > 0, scale, 1.0)
            zero = torch.round(-lo / safe).clamp_(0, 15)
            codes[:, part] = torch.div(v, safe).round_().add_(zero).clamp_(0, 15)
            zeros.append(zero.reshape(n, -1).to(torch.uint8))
        scales.append(scale.reshape(n, -1).to(torch.float16).view(torch.uint8))
    flat = codes.view(n, -1)
    if encoding == "int8":
        rows = [flat.view(torch.uint8)]
    else:
        if flat.shape[1] % 2:
            flat = torch.nn.functional.pad(flat, (0, 1))
        pairs = flat.view(torch.int16)  # little-endian: first code + 256 * second (both < 16)
        rows = [((pairs & 0x0F) | ((pairs >> 4) & 0xF0)).to(torch.uint8)]  # first code in the low nibble
    out = torch.cat(rows + scales + zeros, dim=1)
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
        # (q - z) * s as q * s + (-z * s): both products are exact in fp32 (4-bit by 11-bit
        # mantissas) and so is their sum, so this is the formula's value in one fused pass.
        packed = payload[:, :codes_end]
        q = torch.empty((n, codes_end, 2), dtype=torch.float32, device=payload.device)
        q[:, :, 0] = packed & 0x0F  # low nibble first
        q[:, :, 1] = packed >> 4
        q = q.view(n, -1)
        offsets = -payload[:, codes_end + 2 * (key_groups + value_groups) :].float() * scales
        key_offset = offsets[:, :key_groups].reshape(n, heads, 1, dim)
        value_offset = offsets[:, key_groups:].reshape(n, heads, tokens, 1)
        keys = torch.addcmul(key_offset, q[:, :elements].view(n, heads, tokens, dim), key_scale)
        values = torch.addcmul(value_offset, q[:, elements : 2 * elements].view(n, heads, tokens, dim), value_scale)
    else:
        raise ValueError(f"unknown lossy encoding {encoding!r} (one of int8, int4)")
    out[:, 0].copy_(keys)
    out[:, 1].copy_(values)
