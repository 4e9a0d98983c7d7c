"""Next-layer prefetch: the blocks layer ``l + 1`` will read, predicted from layer ``l``'s input.

At a decode step the residual stream changes little from one decoder layer to the next, so the
query that layer ``l + 1`` is about to make is close to what layer ``l + 1``'s own input norm and
query projection make of layer ``l``'s *input* (InfiniGen, OSDI '24, uses the same observation).
A forward pre-hook on each decoder layer ``l`` computes that estimate (one norm and one
``[hidden, Hq * D]`` projection of one token) and hands it to
:meth:`~hkv.attention.sequence.SequenceKV.prefetch_ahead`, which scores layer ``l + 1``'s block
summaries with it and queues the predicted blocks on the prefetcher. Those reads then have layer
``l``'s whole compute as lead time, and they are predicted from this step's token, where the
same-layer prediction (made at the previous step) is for a query one token older.

A prediction only moves blocks: which blocks a layer reads is chosen by its real query, so the
model's output never depends on this hook (tested bitwise). Models whose layers do not have the
Llama layout (``input_layernorm``, ``self_attn.q_proj``, RoPE) are served without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..positions import RemapUnsupportedError, RotaryShift
from .transformers import _active

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QueryPath:
    """The modules that turn a decoder layer's input hidden state ``[1, 1, hidden]`` into its
    queries before RoPE, ``[q_heads, head_dim]``."""

    norm: torch.nn.Module  # the layer's input_layernorm
    q_proj: torch.nn.Module  # hidden -> q_heads * head_dim
    q_norm: torch.nn.Module | None  # a norm of the projected queries (Qwen3: per head; OLMo2: whole)
    per_head_norm: bool  # q_norm normalises each head's head_dim values (else the whole projection)
    q_heads: int
    head_dim: int

    def query(self, hidden: torch.Tensor) -> torch.Tensor:
        """Queries ``[q_heads, head_dim]`` (pre-RoPE) of the one token of ``hidden`` ``[1, 1, hidden]``."""
        q = self.q_proj(self.norm(hidden)).reshape(-1)
        if self.q_norm is not None and not self.per_head_norm:
            q = self.q_norm(q)
        q = q.view(self.q_heads, self.head_dim)
        if self.q_norm is not None and self.per_head_norm:
            q = self.q_norm(q)
        return q


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's decoder layers (a ModuleList of ``num_hidden_layers`` modules that each have
    ``self_attn`` and ``input_layernorm``), or None."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and count:
            if all(hasattr(layer, "self_attn") and hasattr(layer, "input_layernorm") for layer in module):
                return module
    return None


def query_paths(model: torch.nn.Module) -> list[QueryPath] | None:
    """One :class:`QueryPath` per decoder layer, or None where a layer lacks the Llama layout
    (a fused QKV projection, no input norm, a query norm of an unknown size)."""
    layers = decoder_layers(model)
    config = model.config
    q_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    if layers is None:
        return None
    paths = []
    for layer in layers:
        attention = layer.self_attn
        q_proj = getattr(attention, "q_proj", None)
        if not isinstance(q_proj, torch.nn.Linear) or q_proj.out_features != q_heads * head_dim:
            return None
        q_norm = getattr(attention, "q_norm", None)
        per_head = True
        if q_norm is not None:
            size = getattr(getattr(q_norm, "weight", None), "numel", lambda: None)()
            if size not in (head_dim, q_heads * head_dim):
                return None
            per_head = size == head_dim
        paths.append(QueryPath(layer.input_layernorm, q_proj, q_norm, per_head, q_heads, head_dim))
    return paths


class NextLayerHooks:
    """Forward pre-hooks on decoder layers ``0 .. L-2`` that prefetch layer ``l + 1``'s blocks
    at decode steps of the active hkv cache (see the module docstring). Use :meth:`install`."""

    def __init__(self, layers: torch.nn.ModuleList, paths: list[QueryPath], rotary: RotaryShift) -> None:
        self.paths, self.rotary = paths, rotary
        self.failed = False  # a hook raised once: warned, and the hooks do nothing since
        self._handles = [layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in range(len(layers) - 1)]

    @classmethod
    def install(cls, model: torch.nn.Module) -> NextLayerHooks | None:
        """The hooks on ``model``, or None (logged) where its layers or rotary embedding are not
        supported."""
        paths = query_paths(model)
        layers = decoder_layers(model)
        if paths is None or layers is None:
            log.info("next-layer prefetch off: %s's decoder layers lack the Llama layout", type(model).__name__)
            return None
        try:
            rotary = RotaryShift.of(model)
        except RemapUnsupportedError as error:
            log.info("next-layer prefetch off: %s", error)
            return None
        return cls(layers, paths, rotary)

    def _hook(self, layer: int):
        path = self.paths[layer + 1]

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            cache = _active()
            if cache is None or self.failed:
                return
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None or hidden.dim() != 3 or hidden.shape[1] != 1:
                return  # prefill chunks read every block they need anyway
            try:
                with torch.no_grad():
                    query = path.query(hidden)
                cache.sequence.prefetch_ahead(layer + 1, query, self.rotary)
            except Exception:  # noqa: BLE001 -- a prediction is best effort; the forward must not fail for it
                self.failed = True
                cache.sequence.predicted_ahead = False  # back to the same-layer prediction for every layer
                log.warning("next-layer prefetch failed at layer %d; off for this runtime", layer + 1, exc_info=True)

        return hook

    def remove(self) -> None:
        """Remove the hooks. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
