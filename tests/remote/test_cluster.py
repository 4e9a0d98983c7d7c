"""The remote tier sharded over a 3-node Redis Cluster (issue 19): blocks spread over every
node, and with one node killed the second machine's resume recomputes only the blocks that
were there (all layers of a block position share a node) and continues token-identical."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from hkv import wrap
from hkv.config import RemoteConfig
from hkv.remote.client import RemoteStore
from hkv.sessions import SessionStore
from hkv.sessions.remote import position_groups

from helpers.models import baseline, prompt, wrap_config


def _config(model, tmp_path: Path, machine: str, url: str):
    config = wrap_config(model, tmp_path / machine)
    remote = config.remote.model_copy(update={"url": url, "cluster": True, "timeout_s": 2.0, "lease_s": 5.0})
    return config.model_copy(update={"remote": remote})


@pytest.mark.slow  # ~15-40 s: three nodes started and joined, a 1,000-token session twice
def test_blocks_spread_over_the_nodes_and_a_dead_node_costs_a_recompute(tiny_lm, tmp_path: Path, redis_cluster, caplog) -> None:
    model = tiny_lm()
    with wrap(model, _config(model, tmp_path, "a", redis_cluster.url)) as rt, rt.session("chat") as session:
        turn = session.generate(prompt(1000, seed=8)[0], max_new_tokens=2, do_sample=False)[0]
    per_node = redis_cluster.keys_per_node("hkv:b:*")
    mean = sum(per_node) / 3
    assert sum(per_node) == 2 * (1001 // 16)  # every block, once
    assert all(abs(count - mean) <= 0.2 * mean for count in per_node), per_node
    # kill a node that does not hold the session's own rows
    home = redis_cluster.node_of("hkv:s:{chat}")
    victim = (home + 1) % 3
    with SessionStore.open(tmp_path / "a" / "store") as store:
        keys = store.get("chat").key_digests()  # block-major
    layers = model.config.num_hidden_layers
    names = RemoteStore(RemoteConfig(url=redis_cluster.url, cluster=True))
    groups = position_groups(keys, layers)
    lost = redis_cluster.nodes_of([names.block_name(key, groups) for key in keys] + [names.summary_name(key, groups) for key in keys])
    blocks = len(keys) // layers
    assert lost[: len(keys)] == lost[len(keys) :] and all(len(set(lost[i : i + layers])) == 1 for i in range(0, len(keys), layers))
    missing = lost[: len(keys) : layers].count(victim)  # every layer of a position, and its summaries, on one node
    redis_cluster.kill(victim)
    more = torch.tensor([3, 1, 4])
    with caplog.at_level(logging.WARNING), wrap(model, _config(model, tmp_path, "b", redis_cluster.url)) as rt:
        with rt.session("chat") as session:
            restored = session.kv_tokens  # the blocks before the first missing one
            out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
        stats = rt.stats()
    # prefilled: the recomputed tokens, then the turn's last token (its KV never stored) and the new ones but the last
    recomputed = stats.prompt_tokens - len(more)
    stored = len(turn) - 1
    assert 0 < missing < blocks and "are recomputed" in caplog.text
    assert recomputed == missing * 16 + stored - blocks * 16  # the missing blocks and the tail, nothing else
    assert restored + stats.extra["reused_tokens"] == (blocks - missing) * 16  # every block the server kept
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()
    print(f"blocks per node {per_node}; node {victim} killed: {missing} of {blocks} block positions lived there (every layer), "
          f"{recomputed} of {stored} tokens recomputed")
