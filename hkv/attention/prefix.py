"""Prefix adoption: a sequence takes stored blocks that continue it instead of computing them.

One idea at four levels: :func:`adopt_stored_prefix` finds the longest run of stored blocks
whose chained keys continue a sequence with the given token ids (the store's ``summaries`` rows
give their summaries); :meth:`~hkv.tiers.manager.TierManager.learn_stored` makes the manager
know blocks another process stored since it opened the store; :meth:`SequenceKV.adopt
<hkv.attention.sequence.SequenceKV.adopt>` appends the run as sealed blocks without reading
them; :func:`stored_spans` cuts a prompt into the runs of blocks stored (adopted) and the
spans between them (computed), so that a block missing in the middle (evicted, or lost with a
remote node) costs its own tokens, not every token after it. Used by a session's restore and,
with ``store.reuse_prefix``, by every fill (``Runtime.fill``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..blocks import BlockKey, chain_hashes
from ..store.summary_rows import SummaryRows
from .sequence import SequenceKV


@torch.inference_mode()
def adopt_stored_prefix(seq: SequenceKV, token_ids: torch.Tensor | np.ndarray, *, known_keys: list[list[BlockKey]] | None = None,
                        known_summaries: list[torch.Tensor] | None = None) -> int:  # fmt: skip
    """Adopt into ``seq`` the longest run of stored blocks that continues it with ``token_ids``.

    ``token_ids``: ``[S]``, the tokens that follow the sequence's current length (which must be
    a block boundary, else nothing is adopted). A block is adopted when every layer's block and
    summary are in the manager's store. Returns the tokens adopted (a multiple of
    ``block_tokens``); a transformers cache over ``seq`` must then sync its lengths.

    A session's restore passes what it has already (computing 122,880 keys took 1.4 s at 256K
    tokens): ``known_keys[layer]``, the keys of the blocks of ``token_ids`` (all of them), and
    ``known_summaries[layer]``, the summaries ``[n_i, 2 * kv_heads * head_dim]`` of the first
    blocks in pieces (its summary runs, in block order): only the blocks after those are looked up."""
    bt, first = seq.block_tokens, seq.sealed_blocks()
    if seq.seq_length() != first * bt:
        return 0
    ids = as_ids(token_ids)
    count = len(ids) // bt
    if count <= 0:
        return 0
    previous = seq.prefix_chain()
    if previous is None:
        return 0
    chains = chain_hashes(ids[: count * bt], bt, previous=previous) if known_keys is None else None
    keys = []
    for layer in range(seq.num_layers):  # each layer can only shorten the run
        if known_keys is not None:
            layer_keys = known_keys[layer][:count]
        else:
            layer_keys = [BlockKey.make(seq.fingerprint, chain, layer) for chain in chains[:count]]
        # The manager knows every block of the store it opened (and learns, checking the store,
        # those another process stored since); the summaries, read below, are the other half.
        count = seq.manager.learn_stored(layer_keys[:count])
        if count == 0:
            return 0
        keys.append(layer_keys)
    rows = SummaryRows(seq.manager.store)
    shape = (2, seq.kv_heads, seq.head_dim)
    summaries: list[list[torch.Tensor]] = []
    for layer in range(seq.num_layers):
        pieces = [piece.view(-1, *shape) for piece in known_summaries[layer]] if known_summaries is not None else []
        known = min(count, sum(len(piece) for piece in pieces))
        if known == count:  # all in the session's runs: views, not a copy (95 MB of fp16 at 256K tokens)
            summaries.append(_first_blocks(pieces, count))
            continue
        out = torch.empty(count, *shape, dtype=torch.float32)
        at = 0
        for piece in _first_blocks(pieces, known):
            out[at : at + len(piece)] = piece
            at += len(piece)
        if known < count:
            known += rows.read(keys[layer][known:count], out[known:], relative=seq.summaries.relative)
        count = min(count, known)
        if count == 0:
            return 0
        summaries.append([out])
    seq.note_tokens(torch.from_numpy(ids[: count * bt]))
    seq.adopt(count, [_first_blocks(pieces, count) for pieces in summaries], keys)
    return count * bt


def _first_blocks(pieces: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The first ``count`` rows of the pieces' concatenation, as views of the pieces."""
    out = []
    for piece in pieces:
        if count <= 0:
            break
        out.append(piece[:count])
        count -= len(out[-1])
    return out


def as_ids(token_ids: torch.Tensor | np.ndarray | list[int]) -> np.ndarray:
    """1-D int64 numpy ids (a copy on the CPU)."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().to("cpu").reshape(-1).numpy()
    return np.array(token_ids, dtype=np.int64).reshape(-1)


@dataclass(frozen=True, slots=True)
class Span:
    """Tokens ``[start, end)`` of a prompt (offsets into its ids): a run of complete blocks that
    are stored in every layer (``stored``: adopt them), or tokens to compute."""

    start: int
    end: int
    stored: bool


def stored_spans(seq: SequenceKV, token_ids: torch.Tensor | np.ndarray) -> list[Span]:
    """Cut ``token_ids`` (``[S]``, the tokens that follow ``seq``) into alternating spans:
    runs of complete blocks whose every layer the manager knows (in a tier or in the store,
    learning those another process stored) with its summary row in the store, and the tokens
    between and after them. One span to compute when the sequence is not at a block boundary,
    or its keys do not follow from the ids (:meth:`SequenceKV.prefix_chain`).

    A block's KV depends only on the tokens up to its end, so computing a missing block with
    the blocks before it as context gives the block it had (up to float reduction order), and
    the stored blocks after it stay valid: their chained keys name the same tokens."""
    bt = seq.block_tokens
    ids = as_ids(token_ids)
    count = len(ids) // bt
    previous = seq.prefix_chain()
    if count == 0 or previous is None or seq.seq_length() != seq.sealed_blocks() * bt:
        return [Span(0, len(ids), False)] if len(ids) else []
    chains = chain_hashes(ids[: count * bt], bt, previous=previous)
    stored = [True] * count
    rows = SummaryRows(seq.manager.store)
    for layer in range(seq.num_layers):  # each layer only removes blocks; later layers check fewer
        candidates = [i for i in range(count) if stored[i]]
        if not candidates:
            break
        keys = [BlockKey.make(seq.fingerprint, chains[i], layer) for i in candidates]
        for i, ok in zip(candidates, seq.manager.known(keys)):
            stored[i] = ok
        keys = [key for i, key in zip(candidates, keys) if stored[i]]
        candidates = [i for i in candidates if stored[i]]
        for i, ok in zip(candidates, rows.held(keys, relative=seq.summaries.relative)):  # adoption needs the summaries too
            stored[i] = ok
    spans: list[Span] = []
    for i, ok in enumerate(stored):
        if spans and spans[-1].stored == ok:
            spans[-1] = Span(spans[-1].start, (i + 1) * bt, ok)
        else:
            spans.append(Span(i * bt, (i + 1) * bt, ok))
    if count * bt < len(ids):
        if spans[-1].stored:
            spans.append(Span(count * bt, len(ids), False))
        else:
            spans[-1] = Span(spans[-1].start, len(ids), False)
    return spans
