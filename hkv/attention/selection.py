"""Block summaries and query-aware block selection (Quest).

Per sealed block and KV head the elementwise min and max of the block's keys form its summary.
The upper bound of a query ``q``'s logit on any key of the block is
``sum_d max(q_d * kmin_d, q_d * kmax_d) = relu(q) . kmax + min(q, 0) . kmin`` -- two batched
matmuls over all blocks at once, no Python loop per block.

Scores: per KV head the max over the query heads of its GQA group and over the queries of the
chunk (at most ``SCORE_QUERIES`` of a long prefill chunk: :func:`scoring_queries`) (in pieces, so a 1024-query prefill chunk never builds more than ``_SCORE_ELEMENTS``
floats), then, after subtracting each KV head's logsumexp over the candidate blocks
(``normalize``: a log-softmax per KV head, so heads with sharper score distributions are not
drowned out by heads with larger logits), the max over KV heads: one score per block. The top-k blocks by score are attended; sink and local blocks are always
included and never scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..positions import RotaryShift

_SCORE_ELEMENTS = 1 << 22  # fp32 scores built at once while scoring a chunk (16 MiB)
_EXTEND_PIECE = 128  # blocks per piece of BlockSummaries.extend's transposing copy on a CPU
SCORE_QUERIES = 64  # queries of a long prefill chunk that score blocks (see scoring_queries)
_NO_SCORES = torch.empty(0)  # the scores of a selection that scored nothing (never written to)


def scoring_queries(query: torch.Tensor, limit: int = SCORE_QUERIES) -> torch.Tensor:
    """The queries ``[Hq, S, D]`` of a chunk that score blocks: all when ``S <= limit``; else the
    newest ``limit // 2`` and ``limit - limit // 2`` spread evenly over the rest.

    Scoring costs ``S x n_blocks`` per head: at a million tokens of context (16K blocks) scoring
    all 1024 queries of every prefill chunk would cost more than the model itself. The newest
    queries are kept whole because the last chunk of a prompt usually holds the question.
    """
    index = scoring_index(query.shape[1], limit)
    return query if index is None else query[:, index]


def scoring_index(s: int, limit: int = SCORE_QUERIES) -> torch.Tensor | None:
    """Indices (``LongTensor``, ascending) of the queries :func:`scoring_queries` keeps of ``s``;
    None when it keeps all."""
    if s <= limit:
        return None
    newest = limit // 2
    spread = torch.linspace(0, s - newest - 1, limit - newest).round().long()
    return torch.cat([spread, torch.arange(s - newest, s)])


class BlockSummaries:
    """Min/max key summaries of every sealed block, per layer, on the device.

    ``summary(layer)``: ``[2, kv_heads, head_dim, n_blocks]`` fp32 (index 0 min, 1 max), blocks
    last so scoring is a plain batched matmul on a view, without a copy. Storage grows
    geometrically (doubling, to a power of two), so appending a block is amortised O(1) and nothing is
    re-concatenated per step. Costs ``2 * 4 / (block_tokens * itemsize)`` of the KV's bytes
    (fp32, for exact scoring); lives outside the device tier's budget.

    Each min is rounded down and each max up to the nearest fp16 (:func:`fp16_bounds`; a value
    beyond fp16's range stays as it is): still bounds of the keys, looser by at most one fp16
    step (2^-10 of the value; 6e-8 below 6.1e-5), and then the store keeps them in half the bytes, exactly
    (:mod:`hkv.store.summary_rows`), so a resumed session scores what the first one did.

    Frame: with ``rotary`` None, the summaries bound the keys as stored (post-RoPE at their own
    positions), so a query at its own position gets Quest's bound of its real logits. With a
    :class:`~hkv.positions.RotaryShift` (``attention.positions = "remap"``) every block's keys
    are first rotated back by the block's first position (token ``j`` of a block sits at
    position ``j``): the *relative* frame, in which a query rotated to one fixed position scores
    every block as if it lay at the same distance (:func:`canonical_queries`). Beyond the trained
    length that is what makes far blocks comparable: at positions the model never saw, the stored
    keys' bounds are dominated by rotation artefacts, not content (docs/positions.md).
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, device: torch.device, initial_blocks: int = 64,
                 *, rotary: RotaryShift | None = None) -> None:  # fmt: skip
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.rotary = rotary  # the relative frame
        self.device = torch.device(device)
        self._buffers = [torch.empty(2, kv_heads, head_dim, initial_blocks, device=self.device) for _ in range(num_layers)]
        self._counts = [0] * num_layers

    def count(self, layer: int) -> int:
        return self._counts[layer]

    def summary(self, layer: int) -> torch.Tensor:
        """``[2, kv_heads, head_dim, n_blocks]`` fp32 view (min, max)."""
        return self._buffers[layer][..., : self._counts[layer]]

    def add(self, layer: int, block_keys: torch.Tensor) -> None:
        """Summarise new blocks; ``block_keys``: ``[n, kv_heads, block_tokens, head_dim]``."""
        n = block_keys.shape[0]
        if n == 0:
            return
        buffer = self._reserve(layer, n)
        count = self._counts[layer]
        keys = block_keys.to(device=self.device, dtype=torch.float32)
        if self.rotary is not None:  # relative frame: block b's keys moved back by its first position
            _, h, bt, d = keys.shape
            flat = keys.permute(1, 0, 2, 3).reshape(h, n * bt, d)
            flat = self.rotary.rotate_blocks(flat, [-(count + i) * bt for i in range(n)], bt)
            keys = flat.reshape(h, n, bt, d).permute(1, 0, 2, 3)
        lo, hi = fp16_bounds(keys.amin(dim=2), keys.amax(dim=2))
        buffer[0, :, :, count : count + n] = lo.permute(1, 2, 0)
        buffer[1, :, :, count : count + n] = hi.permute(1, 2, 0)
        self._counts[layer] = count + n

    def extend(self, layer: int, summaries: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Append precomputed summaries ``[n, 2, kv_heads, head_dim]`` fp32 or fp16 (min, max; e.g.
        read from the store), or a sequence of such pieces in block order (room made once for all).
        Bitwise what :meth:`add` computes from the same blocks."""
        pieces = [summaries] if isinstance(summaries, torch.Tensor) else list(summaries)
        for piece in pieces:
            if tuple(piece.shape[1:]) != (2, self.kv_heads, self.head_dim) or piece.dim() != 4:
                raise ValueError(f"extend expects summaries [n, 2, {self.kv_heads}, {self.head_dim}], got {tuple(piece.shape)}")
        n = sum(piece.shape[0] for piece in pieces)
        if n == 0:
            return
        buffer = self._reserve(layer, n)
        count = self._counts[layer]
        for piece in pieces:
            source = piece.to(device=self.device, dtype=torch.float32)
            # On a CPU the transposing copy runs in pieces whose source stays in cache: 2x faster than
            # one copy of a resumed session's 4,096 blocks a layer (3.9 -> 1.9 ms at 256K tokens).
            step = _EXTEND_PIECE if self.device.type == "cpu" else len(source)
            for start in range(0, len(source), step):
                part = source[start : start + step]
                buffer[..., count + start : count + start + len(part)] = part.permute(1, 2, 3, 0)
            count += len(source)
        self._counts[layer] = count

    def export(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Summaries of blocks ``[start, end)``: ``[end - start, 2, kv_heads, head_dim]`` fp32 on the CPU."""
        if not 0 <= start <= end <= self._counts[layer]:
            raise ValueError(f"export: blocks [{start}, {end}) outside the {self._counts[layer]} summarised")
        return self._buffers[layer][..., start:end].permute(3, 0, 1, 2).to("cpu").contiguous()

    def _reserve(self, layer: int, n: int) -> torch.Tensor:
        """The layer's buffer, grown (doubling) to hold ``n`` more blocks."""
        count = self._counts[layer]
        buffer = self._buffers[layer]
        if count + n > buffer.shape[3]:
            # a power of two, also after one big extend (a resumed session): the next block
            # sealed must not copy every summary again (720 MB at 1M tokens)
            capacity = max(2 * buffer.shape[3], 1 << (count + n - 1).bit_length())
            grown = torch.empty(*buffer.shape[:3], capacity, device=self.device)
            grown[..., :count] = buffer[..., :count]
            self._buffers[layer] = buffer = grown
        return buffer

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    @property
    def relative(self) -> bool:
        """True for the relative frame (see the class doc)."""
        return self.rotary is not None


def fp16_bounds(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``lo`` rounded down and ``hi`` rounded up to the nearest fp16 values (fp32 tensors
    again, any shape and device); a value that has no fp16 neighbour on its side (beyond
    +-65504, or NaN) is kept as it is."""
    return _fp16_outward(lo, -math.inf), _fp16_outward(hi, math.inf)


def _fp16_outward(values: torch.Tensor, towards: float) -> torch.Tensor:
    half = values.to(torch.float16)
    back = half.float()
    inward = back > values if towards < 0 else back < values
    half = torch.where(inward, torch.nextafter(half, torch.full_like(half, towards)), half)
    rounded = half.float()
    return torch.where(torch.isfinite(rounded), rounded, values)


def canonical_queries(query: torch.Tensor, first_position: int, distance: int, rotary: RotaryShift, *,
                      non_blocking: bool = False) -> torch.Tensor:  # fmt: skip
    """Queries ``[Hq, S, D]`` at positions ``first_position ...`` rotated to position ``distance``
    each, for scoring relative-frame summaries (:class:`BlockSummaries`): every block is then
    scored as if its first token lay ``distance`` positions before the query. Only the
    :func:`scoring_queries` of a long chunk are kept (and rotated). fp32."""
    index = scoring_index(query.shape[1])
    offsets = torch.arange(query.shape[1], dtype=torch.int64) if index is None else index
    picked = query if index is None else query[:, index.to(query.device)]
    return rotary.rotate(picked, distance - first_position - offsets, non_blocking=non_blocking)


def block_scores(query: torch.Tensor, summary: torch.Tensor, *, normalize: bool = True, scaling: float | None = None,
                 timing: list[float] | None = None) -> torch.Tensor:
    """Quest upper-bound score of each block for ``query``; ``[n_blocks]`` fp32.

    ``query``: ``[q_heads, S, head_dim]`` (any float dtype; GQA: query head ``h`` reads KV head
    ``h // (q_heads // kv_heads)``). ``summary``: ``[2, kv_heads, head_dim, n_blocks]``.
    Per KV head: max over the group's query heads and the ``S`` queries. ``normalize`` turns
    each KV head's bounds into a log-softmax over the blocks (logits scaled by ``scaling``,
    default ``head_dim ** -0.5``): roughly the log of the attention share a block can take in
    that head, so a head whose logits are large but flat does not claim every slot while a head
    with one dominant block does get it. ``timing``: ``timing[0]`` grows by the seconds spent
    in the matmuls over the summaries.
    """
    _, kv_heads, dim, n = summary.shape
    q_heads, s, _ = query.shape
    if n == 0:
        return torch.empty(0, device=summary.device)
    if query.dtype != torch.float32 or query.device != summary.device:
        query = query.to(device=summary.device, dtype=torch.float32)
    q = query.reshape(kv_heads, (q_heads // kv_heads) * s, dim)
    kmin, kmax = summary[0], summary[1]  # [kv_heads, D, n] views
    rows = max(1, _SCORE_ELEMENTS // (kv_heads * n))
    best = None
    started = time.perf_counter()
    for start in range(0, q.shape[1], rows):
        piece = q if rows >= q.shape[1] else q[:, start : start + rows]
        bound = torch.baddbmm(torch.bmm(piece.clamp(min=0), kmax), piece.clamp(max=0), kmin)  # [kv_heads, r, n]
        piece_best = bound.amax(dim=1)
        best = piece_best if best is None else torch.maximum(best, piece_best)
    if timing is not None:
        timing[0] += time.perf_counter() - started
    if normalize:  # one log_softmax kernel (logsumexp and a subtraction are about six launches on a GPU)
        best = torch.log_softmax(best.mul_(dim**-0.5 if scaling is None else scaling), dim=1)
    return best.amax(dim=0)


class Selection:
    """Which past blocks one query chunk of one layer reads, and what to prefetch next.

    ``blocks``: sorted block indices to attend (sink + top-k + local), ``LongTensor`` on CPU.
    ``predicted``: indices of the top ``k + margin`` scored candidates, best first (no sink or
    local blocks: those are pinned on the device); what the prefetcher brings for the next step.
    ``scores``: the selected candidates' scores, aligned with ``scored`` (their indices).
    ``block_list`` / ``predicted_list`` / ``scored_list``: the same indices as Python lists.
    Either form may be given (None for the other): the reader needs lists, so a decode step's
    selection makes only those, and each tensor is made from its list when first read (three
    ``torch.tensor`` calls per layer and step saved).
    ``kernel_s``: seconds spent in the scoring matmuls (the summary bytes read).
    """

    __slots__ = ("_blocks", "_predicted", "_scored", "scores", "block_list", "predicted_list", "scored_list", "kernel_s")

    def __init__(self, blocks: torch.Tensor | None, predicted: torch.Tensor | None, scored: torch.Tensor | None,
                 scores: torch.Tensor, block_list: list[int] | None = None, predicted_list: list[int] | None = None,
                 kernel_s: float = 0.0, scored_list: list[int] | None = None) -> None:  # fmt: skip
        for name, tensor, values in (("blocks", blocks, block_list), ("predicted", predicted, predicted_list),
                                     ("scored", scored, scored_list)):  # fmt: skip
            if tensor is None and values is None:
                raise ValueError(f"Selection: give {name} or {name}_list")
        self._blocks, self._predicted, self._scored, self.scores = blocks, predicted, scored, scores
        self.block_list, self.predicted_list, self.scored_list, self.kernel_s = block_list, predicted_list, scored_list, kernel_s

    @property
    def blocks(self) -> torch.Tensor:
        if self._blocks is None:
            self._blocks = torch.tensor(self.block_list, dtype=torch.long)
        return self._blocks

    @property
    def predicted(self) -> torch.Tensor:
        if self._predicted is None:
            self._predicted = torch.tensor(self.predicted_list, dtype=torch.long)
        return self._predicted

    @property
    def scored(self) -> torch.Tensor:
        if self._scored is None:
            self._scored = torch.tensor(self.scored_list, dtype=torch.long)
        return self._scored

    def indices(self) -> list[int]:
        """``blocks`` as a list."""
        return self.block_list if self.block_list is not None else self._blocks.tolist()

    def prediction(self) -> list[int]:
        """``predicted`` as a list."""
        return self.predicted_list if self.predicted_list is not None else self._predicted.tolist()

    def scored_indices(self) -> list[int]:
        """``scored`` as a list."""
        return self.scored_list if self.scored_list is not None else self._scored.tolist()

    def __repr__(self) -> str:
        return f"Selection(blocks={self.indices()}, predicted={self.prediction()}, scored={self.scored_indices()})"


@dataclass(frozen=True, slots=True)
class SelectionEvent:
    """One block selection of :meth:`~hkv.attention.sequence.SequenceKV.attend`: one query chunk
    of one layer, as an ``on_selection`` observer (:data:`SelectionObserver`) receives it.

    ``layer``: the layer; ``query_start``: the position of the chunk's first query; ``queries``:
    the queries in the chunk (1 at a decode step); ``past_blocks``: the sealed blocks it chose
    among (block ``b`` holds tokens ``b * block_tokens`` to ``(b + 1) * block_tokens - 1``);
    ``selection``: what was chosen (``scored`` is empty where nothing was scored: exact mode, or
    every candidate fits the budget).
    """

    layer: int
    query_start: int
    queries: int
    past_blocks: int
    selection: Selection


SelectionObserver = Callable[[SelectionEvent], Selection | None]
"""Called with every :class:`SelectionEvent` of a sequence (``rt.new_cache(on_selection=...)``),
on the thread running the forward, before the blocks are read. Returns None to keep the
selection, or a :class:`Selection` to read instead (diagnosis: forcing blocks in or out; its
``blocks`` must lie in ``[0, past_blocks)``, and are read sorted and once each; its ``predicted``
go to the prefetcher and its ``scored`` / ``scores`` to score-aware eviction as given)."""


def observed_selection(observer: SelectionObserver, event: SelectionEvent) -> Selection:
    """``event.selection``, or the :class:`Selection` ``observer(event)`` returns instead
    (its blocks sorted, each once); ValueError for a block outside ``[0, past_blocks)``."""
    replaced = observer(event)
    if replaced is None:
        return event.selection
    blocks = torch.unique(torch.as_tensor(replaced.blocks, dtype=torch.long).reshape(-1).cpu())  # sorted
    if blocks.numel() and (int(blocks[0]) < 0 or int(blocks[-1]) >= event.past_blocks):
        raise ValueError(f"on_selection returned blocks {blocks.tolist()} outside [0, {event.past_blocks}) (layer {event.layer})")
    return Selection(blocks, replaced.predicted, replaced.scored, replaced.scores)


def select_blocks(
    query: torch.Tensor,
    summary: torch.Tensor,
    *,
    past_blocks: int,
    sink_blocks: int,
    local_blocks: int,
    topk: int | None,
    margin: float = 0.0,
    normalize: bool = True,
    scaling: float | None = None,
) -> Selection:
    """Choose among the ``past_blocks`` oldest sealed blocks of a layer.

    The first ``sink_blocks`` and the last ``local_blocks`` of the past are always read; of the
    candidates between them the ``topk`` best by :func:`block_scores` of the chunk's
    :func:`scoring_queries` (``topk=None``: exact mode, every block, no scoring). ``margin``: extra candidates predicted for prefetch, as a fraction
    of ``topk``. ``normalize``, ``scaling``: see :func:`block_scores`.
    """
    low = min(sink_blocks, past_blocks)
    high = max(low, past_blocks - local_blocks)
    candidates = high - low
    if topk is None or candidates <= topk:  # every block is read: nothing to score
        every = list(range(past_blocks))
        return Selection(None, None, None, _NO_SCORES, every, every[low:high], scored_list=[])
    timing = [0.0]
    scores = block_scores(scoring_queries(query), summary[..., low:high], normalize=normalize, scaling=scaling, timing=timing)
    want = min(candidates, topk + math.ceil(margin * topk))
    values, order = torch.topk(scores, want, sorted=True)  # best first
    if values.device.type != "cpu":  # one device -> host transfer for both (float64 holds every fp32 score and index exactly)
        both = torch.stack([values.to(torch.float64), order.to(torch.float64)]).cpu()
        values, order = both[0].to(scores.dtype), both[1].to(torch.long)
    k = min(topk, candidates)
    predicted = [i + low for i in order.tolist()]
    chosen = predicted[:k]
    blocks = list(range(low)) + sorted(chosen) + list(range(high, past_blocks))
    return Selection(None, None, None, values[:k], blocks, predicted, timing[0], scored_list=chosen)
