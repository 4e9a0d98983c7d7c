"""attention.positions = "remap": re-rotation math against transformers' RoPE, remapped attention
against attention computed at the new positions, "original" untouched, refusals, config errors;
SmolLM2 passkey with remap (slow)."""

from __future__ import annotations

import pytest
import torch

from hkv import Config, ConfigError, wrap
from hkv.attention.selection import BlockSummaries, block_scores, canonical_queries, select_blocks
from hkv.attention.sequence import SequenceKV
from hkv.positions import RemapUnsupportedError, RotaryShift, far_block_deltas

from helpers.models import tiny_lm
from helpers.sequences import HKV, HQ, LAYERS, D, make_config, open_sequence, reference

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


def _rotary(rope: dict, head_dim: int = D, max_positions: int = 1024) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=head_dim * HQ, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=head_dim,
                         max_position_embeddings=max_positions, rope_parameters=dict(rope))
    return LlamaRotaryEmbedding(config)


def _rope(rotary: LlamaRotaryEmbedding, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` ``[H, N, D]`` pre-RoPE -> post-RoPE at ``positions`` ``[N]``, as the model applies it."""
    cos, sin = rotary(x[None], positions[None])
    out, _ = apply_rotary_pos_emb(x[None], x[None], cos, sin)
    return out[0]


def _rope64(shift: RotaryShift, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Llama RoPE (rotate_half) in float64 with ``shift``'s frequencies."""
    angles = positions.double().unsqueeze(1) * shift.inv_freq.unsqueeze(0)
    angles = torch.cat([angles, angles], dim=1)
    x = x.double()
    half = x.shape[-1] // 2
    return x * angles.cos() + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * angles.sin()


# ---------------------------------------------------------------------------------------------
# The rotation


@pytest.mark.parametrize("rope", sorted(ROPE_TYPES))
def test_rotating_by_delta_equals_rope_at_the_new_position(rope: str) -> None:
    rotary = _rotary(ROPE_TYPES[rope], head_dim=64)
    shift = RotaryShift.of(rotary)
    assert shift.rope_type == rope and shift.rotary_dims == 64
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 200, 64, generator=g)
    # transformers computes position * inv_freq in fp32: below 512 its angles are exact to ~3e-5 rad
    old = torch.randint(0, 512, (200,), generator=g)
    new = torch.randint(0, 512, (200,), generator=g)
    moved = shift.rotate(_rope(rotary, keys, old), new - old)
    expected = _rope(rotary, keys, new)  # attention_scaling (yarn) is in both: a rotation keeps it
    torch.testing.assert_close(moved, expected, atol=1e-4, rtol=1e-4)
    # far positions, against RoPE in float64 with the same frequencies: fp32 tolerance
    old, new = torch.randint(0, 1 << 20, (200,), generator=g), torch.randint(0, 1 << 20, (200,), generator=g)
    moved = shift.rotate(_rope64(shift, keys, old).float(), new - old)
    torch.testing.assert_close(moved, _rope64(shift, keys, new).float(), atol=2e-5, rtol=2e-5)
    # rotations compose and zero is the identity, bit for bit
    assert torch.equal(shift.rotate(keys, torch.zeros(200, dtype=torch.long)), keys)
    blocks = shift.rotate_blocks(keys[:, :192], [5, 0, 300], 64)  # per block = per token with the block's delta
    assert torch.equal(blocks, shift.rotate(keys[:, :192], torch.tensor([5, 0, 300]).repeat_interleave(64)))
    back = shift.rotate(shift.rotate(keys, new - old), old - new)
    torch.testing.assert_close(back, keys, atol=1e-5, rtol=1e-5)


def test_partial_rotary_dimensions_pass_through() -> None:
    shift = RotaryShift(torch.tensor([1.0, 0.1], dtype=torch.float64))  # 4 of 6 dimensions rotate
    keys = torch.randn(2, 5, 6)
    moved = shift.rotate(keys, torch.full((5,), 3))
    assert torch.equal(moved[..., 4:], keys[..., 4:])
    assert not torch.allclose(moved[..., :4], keys[..., :4])
    torch.testing.assert_close(moved.norm(dim=-1), keys.norm(dim=-1))


def test_far_block_deltas_pack_blocks_before_the_boundary() -> None:
    assert far_block_deltas([0, 3, 7], 20) == [17, 15, 12]  # slots 17, 18, 19
    assert far_block_deltas([0, 1, 2], 3) == [0, 0, 0]  # already contiguous: nothing moves
    assert far_block_deltas([], 5) == []
    blocks = [0, 2, 5, 9, 10]
    assert [b + d for b, d in zip(blocks, far_block_deltas(blocks, 12))] == [7, 8, 9, 10, 11]


# ---------------------------------------------------------------------------------------------
# The relative frame of block summaries (remap's scoring)


def test_relative_frame_summaries_do_not_depend_on_the_blocks_position() -> None:
    """The same pre-RoPE keys sealed as block 1 and as block 40 have the same relative-frame
    summary (min / max of the keys roped at 0 .. block-1), and different stored-frame ones."""
    rotary = _rotary(ROPE_TYPES["default"], head_dim=D, max_positions=4096)
    shift = RotaryShift.of(rotary)
    bt = 8
    raw = torch.randn(HKV, bt, D, generator=torch.Generator().manual_seed(3))
    absolute = BlockSummaries(1, HKV, D, "cpu")
    relative = BlockSummaries(1, HKV, D, "cpu", rotary=shift)
    for index in range(41):
        block = _rope(rotary, raw if index in (1, 40) else torch.randn(HKV, bt, D), torch.arange(index * bt, (index + 1) * bt))
        absolute.add(0, block[None])
        relative.add(0, block[None])
    at_zero = _rope(rotary, raw, torch.arange(bt))
    want = torch.stack([at_zero.amin(dim=1), at_zero.amax(dim=1)])  # [2, Hkv, D]
    rel, ab = relative.summary(0), absolute.summary(0)
    for index, slack in ((1, 1e-5), (40, 1e-4)):  # bounds rounded outward to fp16: at most one fp16 step (2^-10) looser
        assert bool((rel[0, ..., index] <= want[0] + slack).all()) and bool((rel[1, ..., index] >= want[1] - slack).all())
        torch.testing.assert_close(rel[..., index], want, atol=1e-4, rtol=2**-10 + slack)
    assert not torch.allclose(ab[..., 1], ab[..., 40], atol=1e-2)
    assert relative.relative and not absolute.relative


def test_canonical_queries_score_far_blocks_by_content_alone() -> None:
    """Two blocks with the same keys, one near and one far: relative-frame scoring gives them
    the same score whatever the query's position; the canonical query is the query roped at
    ``distance``."""
    rotary = _rotary(ROPE_TYPES["default"], head_dim=D, max_positions=1 << 16)
    shift = RotaryShift.of(rotary)
    bt, g = 8, torch.Generator().manual_seed(4)
    raw, q_raw = torch.randn(HKV, bt, D, generator=g), torch.randn(HQ, 1, D, generator=g)
    summaries = BlockSummaries(1, HKV, D, "cpu", rotary=shift)
    n = 502
    keys = torch.randn(HKV, n, bt, D, generator=g)
    keys[:, 1] = keys[:, 500] = raw
    roped = _rope(rotary, keys.reshape(HKV, n * bt, D), torch.arange(n * bt)).reshape(HKV, n, bt, D)
    summaries.add(0, roped.transpose(0, 1))  # blocks seal in order: [n, Hkv, bt, D]
    q_pos = n * bt
    q = _rope(rotary, q_raw, torch.tensor([q_pos]))
    canonical = canonical_queries(q, q_pos, 40, shift)
    torch.testing.assert_close(canonical, _rope(rotary, q_raw, torch.tensor([40])), atol=1e-5, rtol=1e-5)
    scores = block_scores(canonical, summaries.summary(0))
    torch.testing.assert_close(scores[1], scores[500], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# SequenceKV with remap: attention over remapped blocks equals attention at the new positions


def _run_remap_case(tmp_path, appends: list[int], *, chunk: int, seed: int = 0):
    """Pre-RoPE keys roped at their positions are appended; after the last append the hkv output
    must equal attention over the same selection with the far blocks roped at their new positions."""
    block, sink, local, budget = 4, 4, 8, 24
    rotary = _rotary(ROPE_TYPES["default"])
    shift = RotaryShift.of(rotary)
    config = make_config(tmp_path, mode="sparse", block=block, sink=sink, local=local, budget=budget, chunk=chunk,
                         device_blocks=LAYERS * 3 + 8)
    config = Config.load(config, attention={"positions": "remap"}, env={})
    manager, _ = open_sequence(config.model_copy(update={"attention": config.attention.model_copy(update={"positions": "original"})}))
    _.close()
    seq = SequenceKV(manager, config, num_layers=LAYERS, num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, dtype=torch.float32,
                     fingerprint=b"test-model", rotary=shift)
    g = torch.Generator().manual_seed(seed)
    raw_k = [torch.empty(HKV, 0, D) for _ in range(LAYERS)]
    values = [torch.empty(HKV, 0, D) for _ in range(LAYERS)]
    moved_any = False
    try:
        total = 0
        for n in appends:
            seq.note_tokens(torch.randint(0, 1000, (n,), generator=g))
            positions = torch.arange(total, total + n)
            f_start = total - total % block
            for layer in range(LAYERS):
                k = torch.randn(HKV, n, D, generator=g)
                v = torch.randn(HKV, n, D, generator=g)
                q = _rope(rotary, torch.randn(HQ, n, D, generator=g) * 2, positions)
                raw_k[layer] = torch.cat([raw_k[layer], k], dim=1)
                values[layer] = torch.cat([values[layer], v], dim=1)
                seq.append(layer, _rope(rotary, k, positions), v)
                out = seq.attend(layer, q, D**-0.5)
                # the reference, chunk by chunk, as attend cuts the queries
                summary = seq.summaries.summary(layer)
                past = f_start // block
                for c0 in range(0, n, chunk):
                    qc = q[:, c0 : c0 + chunk]
                    q_pos = total + c0
                    nq = qc.shape[1]
                    loc = max(0, local // block - (q_pos + 1 - f_start) // block)
                    scoring = canonical_queries(qc, q_pos, seq.score_distance, shift)  # remap scores in the relative frame
                    chosen = select_blocks(scoring, summary, past_blocks=past, sink_blocks=sink // block, local_blocks=loc,
                                           topk=(budget - sink - local) // block).blocks.tolist()
                    boundary = max(min(sink // block, past), past - loc)
                    far = [b for b in chosen if b < boundary]
                    new_start = {b: (boundary - len(far) + j) * block for j, b in enumerate(far)}
                    moved_any |= any(new_start[b] != b * block for b in far)
                    pos = torch.cat([torch.arange(new_start.get(b, b * block), new_start.get(b, b * block) + block) for b in chosen]
                                    + [torch.arange(f_start, q_pos + nq)])
                    orig = torch.cat([torch.arange(b * block, (b + 1) * block) for b in chosen] + [torch.arange(f_start, q_pos + nq)])
                    keys = _rope(rotary, raw_k[layer][:, orig], pos)
                    vals = values[layer][:, orig]
                    visible = orig.unsqueeze(0) <= torch.arange(q_pos, q_pos + nq).unsqueeze(1)  # causal on original order
                    expected = reference(qc, keys, vals, D**-0.5, mask=visible)
                    torch.testing.assert_close(out[:, c0 : c0 + chunk], expected, atol=2e-5, rtol=2e-5)
                    # the positions the model sees are contiguous, ending at the chunk's last query,
                    # so (appending at most a chunk at a time, as prefill does) every distance is
                    # below budget + chunk + block (the unsealed tail)
                    assert torch.equal(pos.sort().values, torch.arange(q_pos + nq - pos.numel(), q_pos + nq))
                    if n <= chunk:
                        assert int(q_pos + nq - 1 - pos.min()) < budget + chunk + block
            total += n
    finally:
        seq.close()
        manager.close()
    return moved_any


@pytest.mark.parametrize("appends,chunk", [([70, 1, 1, 1], 8), ([40, 37, 2, 1], 16), ([1] * 50, 8), ([64, 56], 32)])
def test_remapped_attention_equals_attention_at_new_positions(tmp_path, appends: list[int], chunk: int) -> None:
    assert _run_remap_case(tmp_path, appends, chunk=chunk), "the case must move some far blocks"


def test_sequence_with_remap_needs_the_rotary(tmp_path) -> None:
    config = Config.load(make_config(tmp_path, mode="sparse", budget=16), attention={"positions": "remap"}, env={})
    with pytest.raises(ValueError, match="rotary"):
        open_sequence(config)


# ---------------------------------------------------------------------------------------------
# Through transformers: a tiny random Llama with a short trained length


def _tiny_llama(max_positions: int = 128, rope: dict | None = None) -> torch.nn.Module:
    return tiny_lm("llama", max_position_embeddings=max_positions,
                   rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})


def _tiny_config(tmp_path, positions: str, *, prefetch: bool = True) -> Config:
    block_bytes = 2 * 2 * 16 * 16 * 4
    return Config(
        tiers={"device": 24 * block_bytes, "host": 12 * block_bytes, "disk": "64MiB", "path": str(tmp_path / f"store-{positions}-{prefetch}")},
        attention={"mode": "sparse", "block_tokens": 16, "sink_tokens": 16, "local_tokens": 32, "budget_tokens": 96,
                   "prefill_chunk_tokens": 32, "positions": positions},
        prefetch={"enabled": prefetch, "workers": 2},
    )


def _logits(model, rt, ids: torch.Tensor) -> torch.Tensor:
    with rt.new_cache() as cache, torch.inference_mode():
        out = []
        for begin in range(0, ids.shape[1], 32):
            out.append(model(input_ids=ids[:, begin : begin + 32], cache=cache).logits)
        return torch.cat(out, dim=1)


def test_remap_equals_original_within_the_budget_and_differs_beyond(tmp_path) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(1))
    logits = {}
    for positions in ("original", "remap"):
        with wrap(model, _tiny_config(tmp_path, positions)) as rt:
            logits[positions] = _logits(model, rt, ids)
    # up to budget_tokens + one chunk every far block is already where remap would put it
    assert torch.equal(logits["original"][:, :128], logits["remap"][:, :128])
    assert not torch.allclose(logits["original"][:, 160:], logits["remap"][:, 160:])
    assert torch.isfinite(logits["remap"]).all()


def test_remap_generates_far_beyond_the_trained_length(tmp_path) -> None:
    model = _tiny_llama(max_positions=64)
    ids = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(2))
    outputs = []
    for prefetch in (True, False):
        with wrap(model, _tiny_config(tmp_path, "remap", prefetch=prefetch)) as rt:
            outputs.append(rt.generate(ids, max_new_tokens=16, do_sample=False))
    assert outputs[0].shape == (1, 616)
    assert torch.equal(outputs[0], outputs[1]), "prefetch must never change remapped results"


def test_original_never_rotates(tmp_path, monkeypatch) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    with wrap(model, _tiny_config(tmp_path, "original")) as rt:
        expected = rt.generate(ids, max_new_tokens=8, do_sample=False)
        assert rt.rotary is None

    def fail(*args, **kwargs):
        raise AssertionError("positions = 'original' must not re-rotate keys")

    monkeypatch.setattr(RotaryShift, "rotate", fail)
    with wrap(model, _tiny_config(tmp_path / "again", "original")) as rt:
        assert torch.equal(rt.generate(ids, max_new_tokens=8, do_sample=False), expected)


def test_dynamic_rope_is_refused_at_wrap(tmp_path) -> None:
    model = _tiny_llama(rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(RemapUnsupportedError, match="dynamic"):
        wrap(model, _tiny_config(tmp_path, "remap"))
    assert model.config._attn_implementation != "hkv", "a refused wrap must leave the model as it was"
    assert not (tmp_path / "store-remap-True").exists(), "a refused wrap must not create its store"
    wrap(model, _tiny_config(tmp_path, "original")).close()  # "original" serves it


def test_model_without_rotary_is_refused() -> None:
    with pytest.raises(RemapUnsupportedError, match="inv_freq"):
        RotaryShift.of(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Config


def test_config_positions() -> None:
    assert Config().attention.positions == "original"
    assert Config(attention={"positions": "remap"}).attention.positions == "remap"
    with pytest.raises(ConfigError, match=r"positions.*mode|mode.*positions"):
        Config(attention={"mode": "exact", "positions": "remap"})
    with pytest.raises(ConfigError, match="attention.positions"):
        Config(attention={"positions": "shifted"})
    assert Config.load(env={"HKV_ATTENTION__POSITIONS": "remap"}).attention.positions == "remap"


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (slow)


@pytest.mark.slow
def test_smollm2_remap_passkey(smollm2, tmp_path) -> None:
    """2K tokens with a 512-token budget: remap moves the far blocks; the key is still found."""
    from hkv.passkey import passkey_answer, passkey_prompt

    model, tokenizer = smollm2
    ids, key = passkey_prompt(tokenizer, 2000, 0.3, seed=11)
    ids = torch.tensor([ids])
    config = Config(
        tiers={"device": "64MiB", "host": "256MiB", "disk": "1GiB", "dtype": "float16", "path": str(tmp_path / "store")},
        attention={"mode": "sparse", "budget_tokens": 512, "block_tokens": 64, "sink_tokens": 64, "local_tokens": 256,
                   "prefill_chunk_tokens": 512, "positions": "remap"},
        prefetch={"enabled": False},
    )
    with wrap(model, config) as rt:
        assert rt.rotary is not None and rt.rotary.rotary_dims == model.config.head_dim
        out = rt.generate(ids, max_new_tokens=7, do_sample=False)
    assert passkey_answer(tokenizer, out[0, ids.shape[1] :]) == key, tokenizer.decode(out[0, ids.shape[1] :])
