"""hkv inside Hugging Face ``transformers`` (tested with transformers 5.x, ``>=5.0,<6``): the
``Cache`` subclass, the "hkv" attention and mask functions, and the hooks that connect them.

How the pieces connect, for one forward of a wrapped model::

    model(input_ids, cache=HkvCache)                      (from rt.generate / model.generate)
      -> forward pre-hook (ModelHooks, installed by wrap): finds the HkvCache in the kwargs,
         refuses batch > 1 and padding masks, calls SequenceKV.note_tokens(input_ids[0]) and
         makes the cache *active* for this thread
      -> create_causal_mask: the "hkv" mask function returns None (no [S, S] mask is built)
      -> each attention layer: cache.update(k, v, layer) -> SequenceKV.append(layer, k[0], v[0])
                               "hkv" attention function -> SequenceKV.attend(layer, q[0], scaling)
      -> forward hook: the previously active cache (usually none) is restored

The attention function does not receive the cache, hence the active cache. A wrapped model called
with any other cache (``DynamicCache``, or none) runs its original attention implementation, so
a baseline and hkv can share one model object. The runtime around this is in
:mod:`hkv.integrations.runtime`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("hkv.integrations.transformers needs transformers>=5.0,<6: pip install 'hkv[hf]'") from error

from ..attention.sequence import SequenceKV
from .model import ModelSpec

ATTN_IMPLEMENTATION = "hkv"


# ---------------------------------------------------------------------------------------------
# The active cache (set by the pre-hook; read by the attention and mask functions)

_LOCAL = threading.local()
_FALLBACK: dict[int, tuple[Any, str]] = {}  # id(model config) -> (config, original attn implementation)


def _active() -> HkvCache | None:
    return getattr(_LOCAL, "cache", None)


def _fallback_name(config: Any) -> str:
    entry = _FALLBACK.get(id(config))
    return entry[1] if entry is not None and entry[0] is config else "sdpa"


def hkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The "hkv" attention function: ``query`` ``[1, Hq, S, D]`` -> ``[1, S, Hq, D]``.

    With an active HkvCache it reads the layer's KV from the cache's SequenceKV (``key`` and
    ``value`` are just the new tokens and are already appended); otherwise it runs the model's
    original attention implementation.
    """
    cache = _active()
    if cache is None:
        name = _fallback_name(module.config)
        function = ALL_ATTENTION_FUNCTIONS.get_interface(name, None)
        if function is None:  # "eager" is not in the registry; the modeling file's own eager is the default
            from transformers.models.llama.modeling_llama import eager_attention_forward as function
        return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"hkv serves batch size 1, got batch size {query.shape[0]}")
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("hkv attention does not support softcap, sliding windows or attention sinks")
    scale = scaling if scaling is not None else getattr(module, "scaling", query.shape[-1] ** -0.5)
    out = cache.sequence.attend(module.layer_idx, query[0], scale)  # [Hq, S, D]
    return out.to(query.dtype).transpose(0, 1).unsqueeze(0).contiguous(), None


def hkv_mask(*, config: Any = None, **kwargs: Any) -> torch.Tensor | None:
    """The "hkv" mask function: no mask for an hkv cache (causality is SequenceKV's job), so a
    long prompt never materialises an [S, S] mask; the original implementation's mask otherwise."""
    if _active() is not None:
        return None
    name = _fallback_name(config)
    function = ALL_MASK_ATTENTION_FUNCTIONS[name] if name in ALL_MASK_ATTENTION_FUNCTIONS else ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    return function(config=config, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, hkv_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, hkv_mask)


# ---------------------------------------------------------------------------------------------
# The Cache


class HkvLayer(CacheLayerMixin):
    """One layer's view of the SequenceKV: counts tokens, forwards appends."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False
    batch_size = 1

    def __init__(self, sequence: SequenceKV, layer: int) -> None:
        super().__init__()
        self.sequence = sequence
        self.layer = layer
        self.length = 0  # tokens appended to this layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, Hkv, S, D], post-RoPE
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.sequence.append(self.layer, key_states[0], value_states[0])
        self.length += key_states.shape[-2]
        # Only the new tokens go back: the "hkv" attention function reads the past from the SequenceKV.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:  # the tiers do the offloading
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        raise NotImplementedError("an HkvCache cannot be reset; create a new one with rt.new_cache()")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("hkv serves batch size 1: beam search (num_beams > 1) is not supported")

    def crop(self, max_length: int) -> None:
        raise ValueError("an HkvCache cannot be cropped (assisted / speculative decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise ValueError(f"hkv serves batch size 1; expanding the cache {repeats} times is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1:
            raise ValueError("hkv serves batch size 1")


class HkvCache(Cache):
    """A transformers ``Cache`` whose KV lives in an hkv SequenceKV (one sequence, all layers).

    Create it with ``rt.new_cache()`` and pass it as ``cache=`` to the wrapped model's
    ``forward`` or ``generate``. Batch size 1 only; no padding, beam search or cropping.
    Close it when done (``with rt.new_cache() as cache: ...``); a cache garbage collected
    unclosed has its blocks released by the runtime's next ``new_cache`` / ``stats`` / ``close``.
    """

    _finalizer: Any = None  # set by Runtime.new_cache: closes the SequenceKV once

    def __init__(self, sequence: SequenceKV, spec: ModelSpec, owner: object, on_close: Callable[[HkvCache], None]) -> None:
        """``owner``: the runtime whose hooks accept this cache; ``on_close(cache)`` is called
        once by :meth:`close`, before the sequence is closed."""
        super().__init__(layers=[HkvLayer(sequence, i) for i in range(spec.num_layers)])
        self.owner, self.spec, self._on_close = owner, spec, on_close
        self.sequence = sequence
        self._live = False  # True while a forward of the wrapped model runs with this cache
        self._closed = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._live:
            raise RuntimeError(
                "HkvCache used outside a model wrapped by hkv.wrap (or after rt.close()); "
                "pass it to the model returned by the runtime that created it"
            )
        if key_states.shape[0] != 1:
            raise ValueError(f"hkv serves batch size 1, got batch size {key_states.shape[0]}")
        return self.layers[layer_idx].update(key_states, value_states)

    def append_kv(self, token_ids: torch.Tensor, keys: Any, values: Any = None) -> None:
        """Append KV computed elsewhere (benchmarks, restored sessions) without a forward.

        ``token_ids``: the ``S`` token ids; ``keys[layer]``, ``values[layer]``: ``[Hkv, S, D]``
        post-RoPE, one entry per layer (or a callable ``layer -> (keys, values)``)."""
        self.sequence.note_tokens(token_ids.reshape(-1))
        for layer, hkv_layer in enumerate(self.layers):
            k, v = (keys(layer) if callable(keys) else (keys[layer], values[layer]))
            if not hkv_layer.is_initialized:
                hkv_layer.lazy_initialization(k, v)
            self.sequence.append(layer, k, v)
            hkv_layer.length += k.shape[-2]

    def sync_lengths(self) -> None:
        """Make every layer's token count the sequence's, after KV was adopted into the sequence
        directly (a restored session, a reused prefix; see ``SequenceKV.adopt``)."""
        spec, tokens = self.spec, self.sequence.seq_length()
        for hkv_layer in self.layers:
            if not hkv_layer.is_initialized:
                hkv_layer.device, hkv_layer.dtype, hkv_layer.is_initialized = spec.device, spec.dtype, True
            hkv_layer.length = tokens

    @property
    def is_compileable(self) -> bool:
        return False

    def close(self) -> None:
        """Release the sequence's device blocks (its sealed blocks stay in the tiers). Idempotent."""
        if not self._closed:
            self._closed = True
            self._on_close(self)
            self.sequence.close()

    def __enter__(self) -> HkvCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Hooks


class ModelHooks:
    """Routes ``model``'s attention to hkv for the calls that pass an HkvCache of ``owner``.

    Sets the model's attention implementation to "hkv" (remembering the original one, which
    serves every other call) and installs the forward pre-hook / hook pair. ``after_forward``
    is called after each hkv forward. :meth:`remove` restores the model.
    """

    def __init__(self, model: torch.nn.Module, owner: object, after_forward: Callable[[], None] | None = None) -> None:
        check_not_wrapped(model)
        self.model, self.owner, self.after_forward = model, owner, after_forward
        self._handles: list[Any] = []
        self.original = model.config._attn_implementation or "sdpa"
        _FALLBACK[id(model.config)] = (model.config, self.original)
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
            self._handles.append(model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True))
        except BaseException:
            self.remove()
            raise

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, HkvCache):
            if cache.owner is not self.owner or cache._closed:
                raise ValueError("this HkvCache was closed or belongs to another runtime; create one with rt.new_cache()")
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("hkv needs input_ids (block keys hash the token ids); inputs_embeds alone are not supported")
            if input_ids.dim() != 2 or input_ids.shape[0] != 1:
                raise ValueError(
                    f"hkv serves batch size 1, got input_ids of shape {tuple(input_ids.shape)} (batch size {input_ids.shape[0]})"
                )
            mask = kwargs.get("attention_mask")
            if mask is not None:
                check_padding(mask)
            cache.sequence.note_tokens(input_ids[0])
        else:
            cache = None
        # Overwrite (never only push): a call whose pre-hook raised cannot leave a stale cache active.
        _LOCAL.stack = getattr(_LOCAL, "stack", []) + [_active()]
        _LOCAL.cache = cache
        if cache is not None:
            cache._live = True

    def _post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = _active()
        stack = getattr(_LOCAL, "stack", [])
        _LOCAL.cache = stack.pop() if stack else None
        if cache is not None:
            cache._live = False
            if self.after_forward is not None:
                self.after_forward()

    def remove(self) -> None:
        """Remove the hooks and restore the original attention implementation. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.model.config._attn_implementation == ATTN_IMPLEMENTATION:
            self.model.set_attn_implementation(self.original)
        entry = _FALLBACK.get(id(self.model.config))
        if entry is not None and entry[0] is self.model.config:
            del _FALLBACK[id(self.model.config)]


def check_not_wrapped(model: torch.nn.Module) -> None:
    """Refuse a model that an open hkv runtime already serves (its attention implementation is "hkv")."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        raise ValueError(
            "this model is already wrapped by hkv (its attention implementation is \"hkv\"); "
            "close the existing runtime (rt.close()) before wrapping it again"
        )


def check_padding(mask: torch.Tensor) -> None:
    """Refuse a 2-D attention mask with zeros (padding) or of batch size > 1."""
    if mask.dim() != 2:
        raise ValueError(f"hkv accepts a 2-D attention_mask of ones only, got a {mask.dim()}-D mask")
    if mask.shape[0] != 1:
        raise ValueError(f"hkv serves batch size 1, got an attention_mask of batch size {mask.shape[0]}")
    if not bool(mask.bool().all()):
        raise ValueError("hkv does not support padding: attention_mask has zeros (batch size 1, no padding tokens)")

