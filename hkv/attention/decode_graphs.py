"""CUDA graphs of a decode step's attention over a resident layer (issue 18's launch overhead).

On a GPU a decode step over a layer whose blocks are all on the device is a few dozen small
kernels (scoring the summaries, top-k, sort, the table lookup, the gather, the attention), each
costing 5-30 us of host time to launch, more than the kernels themselves take at 8K-128K
tokens. Their shapes change only when the layer seals a block (every ``block_tokens`` steps):
the fresh window is read whole, its unwritten end masked (:func:`~hkv.attention.accumulator.attend_one_piece`).
So the layer's work is captured once per geometry and replayed at the cost of one launch; the
step then copies the query and the window's mask row in and the output out.

A capture records the very calls the eager road makes (:meth:`~hkv.attention.sequence.SequenceKV._attend_resident`
passes the same function), so a replay is bitwise the eager result. The graphs of one sequence
share one memory pool and are replayed one after another on the current stream, each output
copied out before the next replay. A capture that fails (an operation a graph cannot hold),
or a sequence's first replay that differs from an eager run of the same inputs, turns graphs
off for the sequence, with the reason in :attr:`DecodeGraphs.failure`; the eager road then
serves, with the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

# (query [Hq, 1, D], mask [1, 1, 1, N]) -> output [Hq, 1, D]: the captured work
Build = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class CapturedRead:
    """One layer's captured attention: ``graph`` reads ``query`` and ``mask`` and writes
    ``out`` (static tensors, their addresses fixed in the graph); valid for ``key``."""

    key: Hashable
    graph: torch.cuda.CUDAGraph
    query: torch.Tensor
    mask: torch.Tensor
    out: torch.Tensor


class DecodeGraphs:
    """The captured decode attention of one sequence's layers (see the module docstring)."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.device = device
        self._reads: list[CapturedRead | None] = [None] * num_layers
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(device)
        self._warm = False
        self.enabled = True
        self.failure: str | None = None  # why graphs were turned off, if they were
        self.captures = 0
        self.replays = 0

    def run(self, layer: int, key: Hashable, build: Build, query: torch.Tensor, tail: torch.Tensor, keys: int) -> torch.Tensor | None:
        """``build(query, mask)`` replayed from the layer's graph for ``key`` (captured first when
        the layer has none for it); a new tensor. ``mask`` ``[1, 1, 1, keys]`` is 0 but for its
        last entries, ``tail`` (the fresh window's row, the only part that changes between the
        steps of one key). None when graphs are off or the capture failed: the caller then runs
        ``build`` itself."""
        if not self.enabled:
            return None
        read = self._reads[layer]
        reference = None
        if read is None or read.key != key:
            self._reads[layer] = None  # the old graph's memory goes back to the pool first
            captured = self._capture(key, build, query, tail, keys)
            if captured is None:
                return None
            read, reference = captured
            self._reads[layer] = read
        read.mask[..., keys - tail.shape[-1] :].copy_(tail)
        read.query.copy_(query)
        read.graph.replay()
        self.replays += 1
        if reference is not None and not torch.equal(read.out, reference):  # the sequence's first capture only
            self._off("a replay differed from the eager run of the same inputs")
            return reference
        return read.out.clone()

    def _capture(self, key: Hashable, build: Build, query: torch.Tensor, tail: torch.Tensor,
                 keys: int) -> tuple[CapturedRead, torch.Tensor | None] | None:  # fmt: skip
        """Capture ``build`` over static inputs on a side stream; None (and graphs off) when it
        cannot be captured. At the sequence's first capture ``build`` first runs eagerly (the
        libraries' lazy set-up happens outside any capture) and that output is returned beside
        the capture, for :meth:`run` to check the first replay against (one synchronisation per
        sequence)."""
        static_query = query.clone()
        static_mask = torch.zeros(1, 1, 1, keys, dtype=tail.dtype, device=self.device)
        static_mask[..., keys - tail.shape[-1] :] = tail
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        reference = None
        try:
            with torch.cuda.stream(self._stream):
                if not self._warm:
                    reference = build(static_query, static_mask)
                    reference.record_stream(current)  # read there (run), maybe returned
                    self._warm = True
                # thread_local: the prefetcher's threads keep copying on their own streams meanwhile
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    out = build(static_query, static_mask)
                finally:
                    graph.capture_end()
        except Exception as error:  # noqa: BLE001 - any capture failure: the eager road serves, same result
            current.wait_stream(self._stream)
            self._off(f"{type(error).__name__}: {error}")
            return None
        current.wait_stream(self._stream)
        self.captures += 1
        return CapturedRead(key, graph, static_query, static_mask, out), reference

    def _off(self, why: str) -> None:
        """Turn graphs off for the sequence (the eager road serves from now on)."""
        self.enabled = False
        self.failure = why
        self._reads = [None] * len(self._reads)

    def forget(self) -> None:
        """Drop every graph (the sequence is closed)."""
        self._reads = [None] * len(self._reads)
