"""Persistent sessions with the device tier on a CUDA GPU (skipped without one): a conversation
committed by a runtime whose blocks live in HBM and pinned host memory resumes in a new runtime
with the same greedy tokens as one uninterrupted session (and as DynamicCache, in exact mode)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from test_sessions import LAYERS, NEW, _baseline, _prompt, _tiny, _two_turns  # noqa: E402


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_session_resumes_on_cuda(tmp_path, mode):
    model = _tiny("llama", layers=LAYERS).to("cuda")
    first, second = _prompt(150, seed=1).to("cuda"), _prompt(40, seed=2).to("cuda")
    a1, a2 = _two_turns(model, tmp_path / "a", first, second, restart=False, mode=mode)
    b1, b2 = _two_turns(model, tmp_path / "b", first, second, restart=True, mode=mode)
    assert torch.equal(a1.cpu(), b1.cpu()) and torch.equal(a2.cpu(), b2.cpu())
    if mode == "exact":
        assert a2.shape[1] == first.shape[1] + second.shape[1] + 2 * NEW
        assert torch.equal(a1.cpu(), _baseline(model, first).cpu())
        assert torch.equal(a2.cpu(), _baseline(model, torch.cat([a1, second], dim=1)).cpu())
