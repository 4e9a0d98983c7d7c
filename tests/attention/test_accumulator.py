"""The log-sum-exp accumulator against torch's scaled_dot_product_attention (GQA, causal, dtypes)."""

from __future__ import annotations

import pytest
import torch

from hkv.attention.accumulator import AttentionAccumulator, attend_causal, causal_mask

from helpers.sequences import reference


def _qkv(hq: int, hkv: int, s: int, n: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, s, d, generator=g).to(dtype)
    k = torch.randn(hkv, n, d, generator=g).to(dtype)
    v = torch.randn(hkv, n, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("pieces", [1, 3, 7])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_pieces_merge_to_full_softmax(hq: int, hkv: int, pieces: int, fused: bool) -> None:
    q, k, v = _qkv(hq, hkv, 1, 50, 16)
    acc = AttentionAccumulator(q, 0.25, hkv, fused=fused)
    for part in torch.tensor_split(torch.arange(50), pieces):
        acc.add(k[:, part], v[:, part])
    torch.testing.assert_close(acc.result(), reference(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s,n", [(1, 1), (5, 5), (17, 40), (33, 33)])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_causal_mask_pieces(s: int, n: int, fused: bool) -> None:
    """Pieces where some queries see no key at all (the fused kernel reports lse 0 there)."""
    q, k, v = _qkv(6, 3, s, n, 8, seed=s)
    acc = AttentionAccumulator(q, 8**-0.5, 3, fused=fused)
    for start in range(0, n, 6):  # pieces of 6 keys, each with its own causal mask
        end = min(n, start + 6)
        acc.add(k[:, start:end], v[:, start:end], causal_mask(n - s, s, start, end - start))
    torch.testing.assert_close(acc.result(), reference(q, k, v, 8**-0.5), atol=1e-5, rtol=1e-5)


def test_causal_mask_shape_and_shortcut() -> None:
    assert causal_mask(10, 1, 0, 11) is None  # every key at or before the query
    mask = causal_mask(3, 2, 2, 4)  # queries at 3, 4; keys at 2..5
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
def test_explicit_mask_and_empty_rows(fused: bool) -> None:
    q, k, v = _qkv(2, 1, 3, 8, 4)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True
    acc = AttentionAccumulator(q, 0.5, 1, fused=fused)
    acc.add(k[:, :0], v[:, :0])  # empty piece is a no-op
    acc.add(k[:, :4], v[:, :4], mask[:, :4])
    acc.add(k[:, 4:], v[:, 4:], mask[:, 4:])
    torch.testing.assert_close(acc.result(), reference(q, k, v, 0.5, mask), atol=1e-5, rtol=1e-5)
    nothing = AttentionAccumulator(q, 0.5, 1, fused=fused)
    nothing.add(k, v, torch.zeros(3, 8, dtype=torch.bool))
    assert torch.equal(nothing.result(), torch.zeros_like(q))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs(dtype: torch.dtype, tol: float) -> None:
    q, k, v = _qkv(4, 2, 9, 40, 32, dtype=dtype)
    out = attend_causal(q, k, v, 32**-0.5, chunk=4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(q, k, v, 32**-0.5), atol=tol, rtol=tol)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_attend_causal_chunks(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import hkv.attention.accumulator as attention

    monkeypatch.setattr(attention, "PIECE_SCORE_ELEMENTS", 256)  # force many key pieces
    q, k, v = _qkv(6, 2, 30, 45, 8)
    torch.testing.assert_close(attend_causal(q, k, v, 0.3, chunk=chunk), reference(q, k, v, 0.3), atol=1e-5, rtol=1e-5)


def test_rejects_bad_grouping() -> None:
    q, _, _ = _qkv(6, 4, 1, 1, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        AttentionAccumulator(q, 1.0, 4)


def test_one_unmasked_piece_is_the_kernel_output_bitwise_as_the_merge_gives_it() -> None:
    # A decode step reads its blocks and fresh window as one piece: the accumulator returns the
    # kernel's output without merging; merging the same piece (a second, empty-visibility piece
    # forces the running state) gives the same bits.
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(6, 1, 16, generator=gen), torch.randn(2, 40, 16, generator=gen), torch.randn(2, 40, 16, generator=gen)
    single = AttentionAccumulator(q, 0.25, 2)
    single.add(k, v)
    merged = AttentionAccumulator(q, 0.25, 2)
    merged.add(k, v)
    merged.add(k[:, :3], v[:, :3], torch.zeros(1, 3, dtype=torch.bool))  # nothing visible: weight 0
    assert single.m is None and merged.m is not None and single.kernel_s > 0
    assert torch.equal(single.result(), merged.result())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_kv_is_add_of_keys_and_values(fused: bool, dtype: torch.dtype) -> None:
    """``add_kv(kv)`` (a decode step's buffer ``[2, Hkv, N, D]``) gives bitwise what ``add(kv[0], kv[1])`` gives,
    for one piece and merged with a second."""
    q, k, v = _qkv(6, 2, 1, 40, 16, seed=3)
    kv = torch.stack([k, v]).to(dtype)
    for pieces in ([kv], [kv[:, :, :25], kv[:, :, 25:]]):
        a, b = AttentionAccumulator(q, 0.25, 2, fused=fused), AttentionAccumulator(q, 0.25, 2, fused=fused)
        for piece in pieces:
            a.add_kv(piece)
            b.add(piece[0], piece[1])
        assert torch.equal(a.result(), b.result())
