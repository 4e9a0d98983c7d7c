"""`hkv tune`'s compute term for a model in sparse mode: hkv's own decode step, every block on the
device (hkv.tune.compute.hkv_step_ms)."""

from __future__ import annotations

from hkv import Config
from hkv.tune.compute import hkv_step_ms


def test_hkv_step_is_timed_on_the_model_and_leaves_it_unwrapped(tiny_lm) -> None:
    model = tiny_lm()
    before = model.config._attn_implementation
    ms = hkv_step_ms(model, Config.load(env={}, tiers={"dtype": "float16"}), 512, steps=2)
    assert 0 < ms < 60_000
    assert model.config._attn_implementation == before  # the runtime it used is closed
