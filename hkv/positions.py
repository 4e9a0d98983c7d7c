"""Re-rotation of post-RoPE keys, for reading contexts beyond a model's trained length.

hkv stores keys after the rotary embedding (RoPE) was applied at their original position ``p``.
RoPE rotates each pair of dimensions ``(x_i, x_{i + D/2})`` (transformers' ``rotate_half``
convention, Llama's) by the angle ``p * inv_freq_i``; rotations compose, so rotating a stored
key once more by ``(p' - p) * inv_freq_i`` gives exactly the key RoPE would have produced at
``p'`` (the ``attention_scaling`` factor some rope types apply is already in the stored key and
is unchanged by a pure rotation). With ``attention.positions = "remap"`` (InfLLM-style),
:class:`~hkv.sequence.SequenceKV` uses this to move the selected far blocks to positions just
before the local window, so every query-key distance the model sees stays within
``budget_tokens + prefill_chunk_tokens`` tokens whatever the context length.

That only holds when the rotary frequencies do not depend on the sequence length:
``dynamic`` (NTK) and ``longrope`` change ``inv_freq`` as the sequence grows, so a key rotated
earlier and a key rotated now disagree; :meth:`RotaryShift.of` refuses them at wrap time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rope types whose inv_freq is fixed for the model's lifetime (transformers' ROPE_INIT_FUNCTIONS).
SHIFT_INVARIANT_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")


class RemapUnsupportedError(ValueError):
    """The model's positions cannot be re-rotated (refused at wrap time, before anything changes)."""


@dataclass(frozen=True, slots=True)
class RotaryShift:
    """Rotates post-RoPE keys by a position delta, with the model's own frequencies.

    ``inv_freq``: ``[R/2]`` float64 on the CPU (angles are computed in float64, then cos/sin
    cast to fp32); ``R = 2 * len(inv_freq)`` dimensions rotate (the first ``R`` of ``head_dim``;
    fewer than ``head_dim`` with partial rotary embeddings), the rest pass through.
    ``rope_type``: the model's rope type, for messages.
    """

    inv_freq: torch.Tensor
    rope_type: str = "default"

    @classmethod
    def of(cls, model: torch.nn.Module) -> RotaryShift:
        """The model's rotary frequencies, taken from its rotary embedding module (so they are the
        ones the model applied, not a recomputation), or :class:`RemapUnsupportedError`."""
        name = type(model).__name__
        found = [(path, m) for path, m in model.named_modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        if not found:
            raise RemapUnsupportedError(
                f'attention.positions = "remap": {name} has no rotary embedding module (no inv_freq buffer); '
                'remap re-rotates RoPE keys, use attention.positions = "original"'
            )
        first = found[0][1].inv_freq
        for path, module in found[1:]:
            if module.inv_freq.shape != first.shape or not torch.equal(module.inv_freq.cpu(), first.cpu()):
                raise RemapUnsupportedError(
                    f'attention.positions = "remap": {name} has rotary embeddings with different frequencies '
                    f"({found[0][0]} and {path}); hkv re-rotates with one set"
                )
        module = found[0][1]
        rope_type = str(getattr(module, "rope_type", "default"))
        if rope_type not in SHIFT_INVARIANT_ROPE_TYPES:
            raise RemapUnsupportedError(
                f'attention.positions = "remap": {name} uses rope_type = {rope_type!r}, whose frequencies change with the '
                f"sequence length, so a stored key cannot be moved by a rotation; remap supports "
                f'{", ".join(SHIFT_INVARIANT_ROPE_TYPES)}. Use attention.positions = "original"'
            )
        config = getattr(model, "config", None)
        head_dim = None
        if config is not None:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim is not None and 2 * first.numel() > head_dim:
            raise RemapUnsupportedError(
                f'attention.positions = "remap": {name} has {first.numel()} rotary frequencies for head_dim = {head_dim}'
            )
        return cls(first.detach().to("cpu", torch.float64).clone(), rope_type)

    @property
    def rotary_dims(self) -> int:
        return 2 * self.inv_freq.numel()

    def _cos_sin(self, deltas: torch.Tensor, device: torch.device, *, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[N, R]`` fp32 of ``deltas`` ``[N]`` positions (angles in float64, on the
        CPU). ``non_blocking``: on CUDA they go up through pinned memory without a blocking copy
        (the same values)."""
        angles = deltas.to("cpu", torch.float64).unsqueeze(1) * self.inv_freq.unsqueeze(0)  # [N, R/2]
        angles = torch.cat([angles, angles], dim=1)
        cos, sin = angles.cos().to(torch.float32), angles.sin().to(torch.float32)
        if non_blocking and torch.device(device).type == "cuda":
            return cos.pin_memory().to(device, non_blocking=True), sin.pin_memory().to(device, non_blocking=True)
        return cos.to(device), sin.to(device)

    def block_cos_sin(self, blocks: int, block_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[blocks, R]`` fp32 on ``device`` of the moves by ``0 .. blocks - 1`` whole
        blocks (``j * block_tokens`` positions): row ``j`` is bitwise what :meth:`rotate_blocks`
        uses for a block moved by ``j`` blocks, so a device-side index into them replaces a host
        list of deltas. Sent up without a blocking copy."""
        return self._cos_sin(torch.arange(blocks, dtype=torch.int64) * block_tokens, device, non_blocking=True)

    def _apply(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``k`` fp32 ``[..., D]``; ``cos``/``sin`` broadcast against ``k[..., :R]``."""
        r, half = self.rotary_dims, self.rotary_dims // 2
        rot = k[..., :r]
        rotated = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], dim=-1) * sin
        return rotated if r == k.shape[-1] else torch.cat([rotated, k[..., r:]], dim=-1)

    def rotate(self, keys: torch.Tensor, deltas: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        """``keys`` ``[H, N, D]`` (post-RoPE, any float dtype) moved by ``deltas`` ``[N]`` positions
        (integers, per token); returns fp32 ``[H, N, D]`` on the keys' device. ``non_blocking``:
        see :meth:`_cos_sin`."""
        cos, sin = self._cos_sin(deltas, keys.device, non_blocking=non_blocking)
        return self._apply(keys.to(torch.float32), cos, sin)

    def rotate_blocks(self, keys: torch.Tensor, block_deltas: list[int], block_tokens: int) -> torch.Tensor:
        """``keys`` ``[H, n * block_tokens, D]`` of ``n`` consecutive gathered blocks, block ``j``
        moved by ``block_deltas[j]`` positions; fp32 (one cos/sin per block, not per token)."""
        cos, sin = self._cos_sin(torch.tensor(block_deltas, dtype=torch.int64), keys.device)  # [n, R]
        return self.rotate_blocks_by(keys, cos, sin, block_tokens)

    def rotate_blocks_by(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_tokens: int) -> torch.Tensor:
        """:meth:`rotate_blocks` with the blocks' cos and sin ``[n, R]`` given (rows of
        :meth:`block_cos_sin`, picked on the device)."""
        h, _, d = keys.shape
        n = cos.shape[0]
        k = keys.to(torch.float32).reshape(h, n, block_tokens, d)
        return self._apply(k, cos[None, :, None], sin[None, :, None]).reshape(h, n * block_tokens, d)


def far_block_deltas(blocks: list[int], boundary_block: int) -> list[int]:
    """Position deltas (in blocks) that move the far ``blocks`` (sorted indices, all below
    ``boundary_block``) to contiguous slots ending just before ``boundary_block``, in their
    original order: the ``j``-th of ``n`` goes to slot ``boundary_block - n + j``. Every delta is
    >= 0 (blocks only move closer); all are 0 when the far blocks already end at the boundary
    without gaps."""
    n = len(blocks)
    return [boundary_block - n + j - index for j, index in enumerate(blocks)]
