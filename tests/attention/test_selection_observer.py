"""The ``on_selection`` hook of ``rt.new_cache`` (a SelectionObserver on SequenceKV): it sees every
block selection, changes nothing when it returns None, and a selection it returns is what is read."""

from __future__ import annotations

import pytest
import torch

from hkv import Config, wrap
from hkv.attention.selection import Selection, SelectionEvent

BLOCK = 16
PROMPT = 200  # 12 sealed blocks: more candidates than the sparse budget's 3 top-k slots
NEW = 4


@pytest.fixture(scope="module")
def model(tiny_lm) -> torch.nn.Module:
    """A tiny random Llama: 2 layers, 4 query / 2 KV heads of 16 dims, sharpened logits."""
    return tiny_lm("llama")


def config(tmp_path, mode: str) -> Config:
    block_bytes = 2 * 2 * BLOCK * 16 * 4  # 2 KV heads x 16 dims, fp32
    return Config(
        tiers={"device": 64 * block_bytes, "host": 64 * block_bytes, "disk": 64 * 2**20, "path": str(tmp_path / mode)},
        attention={"mode": mode, "block_tokens": BLOCK, "sink_tokens": BLOCK, "local_tokens": 2 * BLOCK,
                   "budget_tokens": 6 * BLOCK, "prefill_chunk_tokens": 64},
        prefetch={"enabled": False},
    )  # fmt: skip


def answer(model, tmp_path, mode: str, on_selection=None) -> tuple[list[int], torch.Tensor]:
    """``(the NEW tokens generated greedily, their logits [NEW, vocab])``."""
    ids = torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with wrap(model, config(tmp_path, mode)) as rt, rt.new_cache(on_selection=on_selection) as cache:
        rt.fill(cache, ids[0, :-1], progress=False)
        out = rt.generate_with(cache, ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences[0, PROMPT:].tolist(), torch.cat(out.logits)


def test_observer_sees_every_selection_and_changes_nothing(model, tmp_path):
    events: list[SelectionEvent] = []
    plain, plain_logits = answer(model, tmp_path / "plain", "sparse")
    observed, observed_logits = answer(model, tmp_path / "observed", "sparse", on_selection=events.append)
    assert observed == plain and torch.equal(observed_logits, plain_logits)  # an observer returning None changes nothing
    layers = model.config.num_hidden_layers
    # prefill chunks of 64 tokens (199 tokens: 4 chunks), then NEW decode steps (the last prompt token first)
    starts = sorted({e.query_start for e in events})
    assert starts == [0, 64, 128, 192] + [PROMPT - 1 + i for i in range(NEW)]
    for start in starts:
        at = [e for e in events if e.query_start == start]
        assert sorted(e.layer for e in at) == list(range(layers)), start
        for e in at:
            assert e.queries == (1 if start >= PROMPT - 1 else min(64, PROMPT - 1 - start))
            assert e.past_blocks <= (start + e.queries) // BLOCK
            blocks = e.selection.blocks.tolist()
            assert blocks == sorted(set(blocks)) and all(0 <= b < e.past_blocks for b in blocks)
    decode = [e for e in events if e.queries == 1]
    # at a decode step of 12+ sealed blocks the sparse budget (6 blocks) leaves candidates to score
    assert all(e.selection.scored.numel() == 3 and len(e.selection.blocks) == 6 for e in decode)


def test_exact_mode_selects_every_block_and_scores_none(model, tmp_path):
    events: list[SelectionEvent] = []
    answer(model, tmp_path, "exact", on_selection=events.append)
    assert events
    for e in events:
        assert e.selection.blocks.tolist() == list(range(e.past_blocks))
        assert e.selection.scored.numel() == 0


def test_a_returned_selection_is_what_is_read(model, tmp_path):
    """Forcing every block into sparse mode's selection reads what exact mode reads."""

    def every_block(event: SelectionEvent) -> Selection:
        s = event.selection
        return Selection(torch.arange(event.past_blocks - 1, -1, -1), s.predicted, s.scored, s.scores)  # unsorted: sorted on use

    _, sparse = answer(model, tmp_path / "sparse", "sparse")
    _, forced = answer(model, tmp_path / "forced", "sparse", on_selection=every_block)
    _, exact = answer(model, tmp_path / "exact", "exact")
    assert not torch.allclose(sparse, exact, atol=1e-4)  # sparse reads 6 of 12+ blocks: other logits
    torch.testing.assert_close(forced, exact)


def test_a_selection_outside_the_past_blocks_is_refused(model, tmp_path):
    def too_far(event: SelectionEvent) -> Selection:
        s = event.selection
        return Selection(torch.tensor([event.past_blocks]), s.predicted, s.scored, s.scores)

    with pytest.raises(ValueError, match="on_selection returned blocks"):
        answer(model, tmp_path, "sparse", on_selection=too_far)


def test_kv_of_an_observed_cache_is_never_shared_with_other_caches(tiny_lm, tmp_path):
    """A forced selection changes the KV: its blocks must never be found or adopted by a cache
    without the observer (same tokens, same config)."""
    from helpers.models import prompt, wrap_config

    model = tiny_lm()
    ids = prompt(200)[0]
    with wrap(model, wrap_config(model, tmp_path, mode="sparse")) as rt:
        with rt.new_cache(on_selection=lambda event: None) as observed:
            rt.fill(observed, ids)
            seen = observed.sequence.block_keys(0)
            assert observed.sequence.prefix_chain() is None  # nothing stored can be adopted into it
        with rt.new_cache() as plain:
            rt.fill(plain, ids)
            assert seen and set(seen).isdisjoint(plain.sequence.block_keys(0))


@pytest.mark.parametrize(("run", "expected"), [
    (12, [(PROMPT, 12)]),  # at most prefill_chunk_tokens: generate's first forward takes the run whole
    (100, [(PROMPT, 64), (PROMPT + 64, 35), (PROMPT + 99, 1)]),  # longer: filled in chunks, its last token alone
])  # fmt: skip
def test_fill_for_generate_leaves_a_short_run_to_generate(model, tmp_path, run, expected):
    ids = torch.randint(0, 256, (1, PROMPT + run), generator=torch.Generator().manual_seed(2))
    events: list[SelectionEvent] = []
    with wrap(model, config(tmp_path, "sparse")) as rt, rt.new_cache(on_selection=events.append) as cache:
        rt.fill(cache, ids[0, :PROMPT], progress=False)
        events.clear()
        rt.fill_for_generate(cache, ids[0, PROMPT:], progress=False)
        assert cache.get_seq_length() == (PROMPT if run <= 64 else PROMPT + run - 1)
        out = rt.generate_with(cache, ids, max_new_tokens=1, do_sample=False)
        assert cache.get_seq_length() == PROMPT + run
    assert out.shape == (1, PROMPT + run + 1)
    layers = model.config.num_hidden_layers
    assert sorted((e.query_start, e.queries) for e in events) == sorted(x for x in expected for _ in range(layers))
