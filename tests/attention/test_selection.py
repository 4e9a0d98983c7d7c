"""Block summaries, Quest upper-bound scores and top-k selection."""

from __future__ import annotations

import pytest
import torch

import hkv.attention.selection as predictor
from hkv.attention.selection import BlockSummaries, block_scores, select_blocks


def _summaries(blocks: torch.Tensor) -> BlockSummaries:
    """``blocks``: ``[n, Hkv, bt, D]`` keys; one layer."""
    s = BlockSummaries(1, blocks.shape[1], blocks.shape[3], torch.device("cpu"), initial_blocks=2)
    s.add(0, blocks[:3])
    s.add(0, blocks[3:])  # grows past the initial capacity
    return s


def brute_bound(query: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per block: max over KV heads of (max over group heads and queries of the bound), by loops."""
    hq, s, _ = query.shape
    n, hkv, _, _ = blocks.shape
    group = hq // hkv
    out = torch.empty(n, hkv)
    for b in range(n):
        for h in range(hkv):
            kmin, kmax = blocks[b, h].amin(0), blocks[b, h].amax(0)
            best = -float("inf")
            for j in range(group):
                for t in range(s):
                    q = query[h * group + j, t]
                    best = max(best, float(torch.maximum(q * kmin, q * kmax).sum()))
            out[b, h] = best
    return out


def test_one_big_extend_leaves_room_for_the_next_blocks() -> None:
    # a resumed session extends by every stored summary at once; sealing the next block must not
    # copy them all again (at 1M tokens: 720 MB, once, on the first step that seals a block)
    s = BlockSummaries(1, 2, 8, torch.device("cpu"), initial_blocks=4)
    s.extend(0, torch.randn(37, 2, 2, 8))
    buffer = s._buffers[0]
    assert buffer.shape[3] == 64  # the next power of two
    s.add(0, torch.randn(3, 2, 4, 8))
    assert s._buffers[0] is buffer and s.count(0) == 40


def test_extend_is_bitwise_what_add_computes_across_its_pieces() -> None:
    # extend copies in pieces of _EXTEND_PIECE blocks on a CPU: more blocks than two pieces, onto
    # a layer that already holds some, must land exactly where add would have put them
    blocks = torch.randn(2 * predictor._EXTEND_PIECE + 37, 2, 4, 8)
    added = BlockSummaries(1, 2, 8, torch.device("cpu"), initial_blocks=4)
    added.add(0, blocks)
    extended = BlockSummaries(1, 2, 8, torch.device("cpu"), initial_blocks=4)
    extended.add(0, blocks[:5])
    extended.extend(0, added.export(0, 5, len(blocks)))
    assert torch.equal(extended.summary(0), added.summary(0))


def test_summary_is_min_max_and_grows() -> None:
    blocks = torch.randn(9, 2, 4, 8).half().float()  # keys that are fp16 values: bounds exactly min / max
    s = _summaries(blocks)
    assert s.count(0) == 9
    summary = s.summary(0)
    assert summary.shape == (2, 2, 8, 9)  # min/max, kv heads, dims, blocks
    assert torch.equal(summary[0], blocks.amin(2).permute(1, 2, 0)) and torch.equal(summary[1], blocks.amax(2).permute(1, 2, 0))


def test_summary_of_fp32_keys_is_rounded_outward_to_fp16() -> None:
    torch.manual_seed(0)
    blocks = torch.randn(9, 2, 4, 8) * 3
    blocks[0, 0, 0, :3] = torch.tensor([7e4, -7e4, 65510.0])  # beyond fp16: kept in fp32
    summary = _summaries(blocks).summary(0)
    lo, hi = blocks.amin(2).permute(1, 2, 0), blocks.amax(2).permute(1, 2, 0)
    assert bool((summary[0] <= lo).all()) and bool((summary[1] >= hi).all())
    assert bool((summary[0] < lo).any()) and bool((summary[1] > hi).any())  # rounded, not left
    step = (lo.abs().clamp(min=2**-14) * 2**-10, hi.abs().clamp(min=2**-14) * 2**-10)  # one fp16 step at most
    assert bool((lo - summary[0] <= step[0]).all()) and bool((summary[1] - hi <= step[1]).all())
    inside = summary.abs() <= 65504
    assert torch.equal(summary[inside].half().float(), summary[inside])  # what the store keeps in fp16, exactly
    assert summary[1, 0, 0, 0] == 7e4 and summary[0, 0, 1, 0] == -7e4 and summary[1, 0, 2, 0] == 65510.0


def test_fp16_bounds_keep_nan_and_move_only_inexact_values() -> None:
    values = torch.tensor([1.0, 1 / 3, -1 / 3, 0.0, -0.0, 1e-9, -1e-9, float("nan"), float("inf"), 65504.0])
    lo, hi = predictor.fp16_bounds(values, values)
    assert torch.equal(lo[[0, 3, 8, 9]], values[[0, 3, 8, 9]]) and torch.equal(hi[[0, 3, 9]], values[[0, 3, 9]])
    assert lo[1] < values[1] < hi[1] and lo[2] < values[2] < hi[2] and lo[5] == 0 < values[5] < hi[5]
    assert torch.isnan(lo[7]) and torch.isnan(hi[7])


@pytest.mark.parametrize("hq,hkv,s", [(4, 2, 1), (6, 3, 5), (2, 2, 3)])
def test_scores_match_brute_force_bound(hq: int, hkv: int, s: int) -> None:
    torch.manual_seed(hq + s)
    blocks = torch.randn(7, hkv, 4, 8).half().float()  # fp16 keys: the summary is exactly min / max
    query = torch.randn(hq, s, 8)
    expected = brute_bound(query, blocks)
    summary = _summaries(blocks).summary(0)
    torch.testing.assert_close(block_scores(query, summary, normalize=False), expected.amax(1), atol=1e-5, rtol=1e-5)
    normalized = torch.log_softmax(expected * 0.5, dim=0)
    torch.testing.assert_close(block_scores(query, summary, scaling=0.5), normalized.amax(1), atol=1e-5, rtol=1e-5)


def test_bound_is_an_upper_bound_of_every_logit() -> None:
    torch.manual_seed(3)
    blocks = torch.randn(5, 1, 16, 8)
    query = torch.randn(1, 1, 8)
    scores = block_scores(query, _summaries(blocks).summary(0), normalize=False)
    logits = torch.einsum("d,bnd->bn", query[0, 0], blocks[:, 0])
    assert bool((scores + 1e-5 >= logits.amax(1)).all())


def test_scores_in_pieces_equal_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    summary = _summaries(torch.randn(11, 2, 4, 8)).summary(0)
    query = torch.randn(4, 37, 8)
    whole = block_scores(query, summary)
    monkeypatch.setattr(predictor, "_SCORE_ELEMENTS", 50)  # a few query rows per piece
    torch.testing.assert_close(block_scores(query, summary), whole)


def _planted(n: int, hot: list[int], d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    blocks = torch.randn(n, 2, 4, d) * 0.1
    direction = torch.randn(d)
    direction /= direction.norm()
    for b in hot:
        blocks[b, 1, 2] = 10 * direction  # one key of KV head 1 points at the query
    query = direction.repeat(4, 1, 1) * 3  # [Hq=4, S=1, D]
    return query, blocks


def test_planted_blocks_win_and_sink_local_always_included() -> None:
    query, blocks = _planted(20, hot=[7, 12])
    summary = _summaries(blocks).summary(0)
    sel = select_blocks(query, summary, past_blocks=20, sink_blocks=1, local_blocks=2, topk=2, margin=0.5)
    assert sel.blocks.tolist() == [0, 7, 12, 18, 19]
    assert sel.predicted.tolist()[:2] in ([7, 12], [12, 7]) and len(sel.predicted) == 3
    assert set(sel.scored.tolist()) == {7, 12} and sel.scores.shape == (2,)
    # the planted block in the sink or local window is not double counted
    query, blocks = _planted(20, hot=[0, 19])
    sel = select_blocks(query, _summaries(blocks).summary(0), past_blocks=20, sink_blocks=1, local_blocks=2, topk=3)
    assert len(sel.blocks) == 6 and sel.blocks[0] == 0 and sel.blocks[-2:].tolist() == [18, 19]
    assert torch.equal(sel.blocks, torch.sort(sel.blocks).values)


def test_only_past_blocks_are_candidates() -> None:
    query, blocks = _planted(20, hot=[15])
    summary = _summaries(blocks).summary(0)
    sel = select_blocks(query, summary, past_blocks=12, sink_blocks=1, local_blocks=2, topk=2)
    assert max(sel.blocks.tolist()) == 11 and 15 not in sel.blocks.tolist()


@pytest.mark.parametrize("past", [0, 1, 2, 3, 5])
def test_short_pasts_and_exact_mode(past: int) -> None:
    query, blocks = _planted(8, hot=[3])
    summary = _summaries(blocks).summary(0)
    sparse = select_blocks(query, summary, past_blocks=past, sink_blocks=1, local_blocks=2, topk=4)
    assert sparse.blocks.tolist() == list(range(past))  # everything fits the budget
    exact = select_blocks(query, summary, past_blocks=past, sink_blocks=1, local_blocks=2, topk=None)
    assert exact.blocks.tolist() == list(range(past))


def test_exact_mode_selects_every_block_without_scoring() -> None:
    query, blocks = _planted(30, hot=[3])
    sel = select_blocks(query, _summaries(blocks).summary(0), past_blocks=30, sink_blocks=1, local_blocks=2, topk=None)
    assert sel.blocks.tolist() == list(range(30)) and sel.predicted.tolist() == list(range(1, 28))


def test_selection_scores_are_the_chosen_blocks_scores_with_one_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    query, blocks = torch.randn(4, 2, 8), torch.randn(30, 2, 4, 8)
    summary = _summaries(blocks).summary(0)
    sel = select_blocks(query, summary, past_blocks=30, sink_blocks=1, local_blocks=2, topk=5, margin=0.4)
    scores = block_scores(query, summary[..., 1:28])
    order = torch.topk(scores, 7, sorted=True).indices
    assert sel.predicted.tolist() == (order + 1).tolist()
    assert sel.scored.tolist() == (order[:5] + 1).tolist()
    assert sel.scores.dtype == scores.dtype and torch.equal(sel.scores, scores[order[:5]])
    assert sel.blocks.tolist() == [0, *sorted((order[:5] + 1).tolist()), 28, 29]
    # at most one device -> host copy per selection (CPU tensors count their .cpu() calls here;
    # on the CPU the top-k is on the host already, and is read without one)
    calls = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or cpu(self, *a, **k))
    select_blocks(query, summary, past_blocks=30, sink_blocks=1, local_blocks=2, topk=5, margin=0.4)
    assert len(calls) <= 1


def test_scoring_queries_keep_short_chunks_and_the_newest_of_long_ones() -> None:
    from hkv.attention.selection import scoring_queries

    short = torch.randn(3, 10, 4)
    assert scoring_queries(short, limit=16) is short
    long = torch.arange(100, dtype=torch.float32).reshape(1, 100, 1).expand(2, 100, 4)
    picked = scoring_queries(long, limit=16)[0, :, 0].long().tolist()
    assert len(picked) == 16
    assert picked[-8:] == list(range(92, 100))  # the newest half, whole
    assert picked[0] == 0 and picked[7] == 91  # the rest spread over the older queries
    assert picked == sorted(picked)


def test_selection_lists_and_tensors_agree() -> None:
    """A decode step's selection is made as lists; its tensors, made on first read, hold the same
    indices (and ``scored`` is the chosen top-k, ``scores`` aligned with it)."""
    g = torch.Generator().manual_seed(5)
    summary = torch.randn(2, 2, 8, 40, generator=g).sort(dim=0).values  # min <= max
    q = torch.randn(4, 1, 8, generator=g)
    sel = select_blocks(q, summary, past_blocks=40, sink_blocks=1, local_blocks=3, topk=5, margin=0.4)
    assert sel.block_list is not None and sel.predicted_list is not None and sel.scored_list is not None
    assert sel.blocks.tolist() == sel.indices() and sel.blocks.dtype == torch.long
    assert sel.predicted.tolist() == sel.prediction() and len(sel.prediction()) == 7
    assert sel.scored.tolist() == sel.scored_indices() == sel.prediction()[:5]
    assert sel.scores.shape == (5,) and sorted(sel.scored_indices()) == sel.indices()[1:-3]
    every = select_blocks(q, summary, past_blocks=6, sink_blocks=1, local_blocks=3, topk=5)  # nothing to score
    assert every.blocks.tolist() == list(range(6)) and every.predicted.tolist() == [1, 2]
    assert every.scored.numel() == 0 and every.scores.numel() == 0
    given = predictor.Selection(torch.tensor([0, 3]), torch.tensor([3]), torch.tensor([3]), torch.zeros(1))  # tensors only
    assert given.indices() == [0, 3] and given.prediction() == [3] and given.scored_indices() == [3]
    with pytest.raises(ValueError, match="blocks"):
        predictor.Selection(None, torch.tensor([3]), torch.tensor([3]), torch.zeros(1))


@pytest.mark.cuda
def test_cuda_summaries_are_the_cpu_ones() -> None:
    """On a GPU the outward fp16 rounding (nextafter on half) gives the CPU's bounds bitwise."""
    torch.manual_seed(6)
    blocks = torch.randn(9, 2, 4, 8) * 3
    blocks[0, 0, 0, :2] = torch.tensor([7e4, -7e4])
    on_gpu = BlockSummaries(1, 2, 8, torch.device("cuda"), initial_blocks=2)
    on_gpu.add(0, blocks.cuda())
    assert torch.equal(on_gpu.summary(0).cpu(), _summaries(blocks).summary(0))
