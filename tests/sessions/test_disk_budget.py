"""A disk budget below a session's KV (issue 16 (8)): a turn whose blocks cannot fit
``tiers.disk`` is refused up front naming it, and no other session loses its KV for it; a turn
that fits once an older session's KV is dropped goes on, and that session resumes token-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hkv import wrap
from hkv.errors import TierFullError
from hkv.sessions.store import SessionStore

from helpers.models import baseline, block_bytes, prompt, wrap_config


@pytest.fixture
def config(tiny_lm, tmp_path: Path):
    model = tiny_lm()
    config = wrap_config(model, tmp_path)
    disk = 60 * (block_bytes(model) + 64)  # 60 records: 30 blocks per layer, 480 tokens
    return model, config.model_copy(update={"tiers": config.tiers.model_copy(update={"disk": disk})})


def _kv_tokens(config) -> dict[str, int]:
    with SessionStore.open(config.tiers.path) as store:
        return {info.name: info.kv_tokens for info in store.list()}


def test_a_turn_that_cannot_fit_the_disk_budget_is_refused_and_costs_no_session(config) -> None:
    model, config = config
    with wrap(model, config) as rt:
        with rt.session("A") as session:
            first = session.generate(prompt(400, seed=1)[0], max_new_tokens=2, do_sample=False)[0]
        with rt.session("B") as session:
            with pytest.raises(TierFullError, match=r"more than tiers.disk = \d+ bytes holds \(60 blocks\)"):
                session.generate(prompt(500, seed=2)[0], max_new_tokens=2, do_sample=False)
            with pytest.raises(TierFullError, match="tiers.disk"):
                session.append(prompt(900, seed=3)[0])
            assert len(session.tokens) == 0
    assert _kv_tokens(config)["A"] == 401  # A kept its KV
    # B fits once A's KV is dropped (the LRU session not open): it goes on; A resumes token-exact
    with wrap(model, config) as rt:
        with rt.session("B") as session:
            session.generate(prompt(300, seed=2)[0], max_new_tokens=2, do_sample=False)
        assert {info.name: info.kv_tokens for info in rt.session_store().list()} == {"A": 0, "B": 301}
        with rt.session("A") as session:
            out = session.generate(torch.tensor([5, 6]), max_new_tokens=3, do_sample=False)[0]
    assert out.tolist() == baseline(model, torch.cat([first, torch.tensor([5, 6])]).unsqueeze(0), 3)[0].tolist()
