"""Sessions through the remote tier (issue 19) on a real redis-server: a second "machine" (its
own local store) resumes the first's conversation token-identical; a lease keeps two writers
apart; a block damaged or evicted on the server is recomputed; the server down costs nothing
local."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis
import torch

from hkv import wrap
from hkv.config import RemoteConfig
from hkv.remote.client import RemoteStore
from hkv.sessions import SessionLockedError, SessionStore
from hkv.sessions.remote import position_groups

from helpers.models import baseline, prompt, wrap_config


def _config(model, tmp_path: Path, machine: str, url: str):
    config = wrap_config(model, tmp_path / machine)
    return config.model_copy(update={"remote": config.remote.model_copy(update={"url": url, "lease_s": 5.0})})


def test_a_second_machine_resumes_the_conversation_token_identical(tiny_lm, tmp_path: Path, redis_server) -> None:
    model = tiny_lm()
    first = prompt(300, seed=5)[0]
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as rt, rt.session("chat") as session:
        turn = session.generate(first, max_new_tokens=4, do_sample=False)[0]
    more = torch.tensor([10, 20, 30])
    with wrap(model, _config(model, tmp_path, "b", redis_server.url)) as rt:  # a store that never saw "chat"
        with rt.session("chat") as session:
            assert session.tokens.tolist() == turn.tolist() and session.kv_tokens == len(turn) - 1
            out = session.generate(more, max_new_tokens=4, do_sample=False)[0]
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 4)[0].tolist()
    keys = redis.Redis.from_url(redis_server.url).keys("hkv:s:*")
    assert keys == [b"hkv:s:{chat}"]


def test_a_lease_keeps_a_second_writer_out(tiny_lm, tmp_path: Path, redis_server) -> None:
    model, other = tiny_lm(), tiny_lm()  # the same weights: the same model on two "machines"
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as a, a.session("chat") as session:
        session.generate(prompt(40)[0], max_new_tokens=2, do_sample=False)
        with wrap(other, _config(other, tmp_path, "b", redis_server.url)) as b:
            with pytest.raises(SessionLockedError, match="open for writing on another machine"):
                b.session("chat")
    with wrap(model, _config(model, tmp_path, "b", redis_server.url)) as b, b.session("chat") as session:  # released
        assert len(session.tokens) == 42


def test_blocks_damaged_or_gone_on_the_server_are_recomputed(tiny_lm, tmp_path: Path, redis_server, caplog) -> None:
    model = tiny_lm()
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as rt, rt.session("chat") as session:
        turn = session.generate(prompt(300, seed=6)[0], max_new_tokens=2, do_sample=False)[0]
    client = redis.Redis.from_url(redis_server.url)
    blocks = sorted(client.keys("hkv:b:*"))
    client.delete(blocks[0])  # the server's eviction
    damaged = bytearray(client.get(blocks[1]))
    damaged[-1] ^= 0xFF
    client.set(blocks[1], bytes(damaged))
    more = torch.tensor([1, 2])
    with caplog.at_level(logging.WARNING), wrap(model, _config(model, tmp_path, "b", redis_server.url)) as rt:
        with rt.session("chat") as session:
            assert session.kv_tokens < len(turn) - 1  # cut at the first missing block
            out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
    assert "checksum mismatch" in caplog.text and "are recomputed" in caplog.text
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()


def test_only_the_blocks_missing_on_the_server_are_recomputed(tiny_lm, tmp_path: Path, redis_server, caplog) -> None:
    """A block evicted in the middle (one layer's copy): the second machine adopts the blocks
    before and after it and computes that block's tokens (and the tail's) only."""
    model = tiny_lm()
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as rt, rt.session("chat") as session:
        turn = session.generate(prompt(300, seed=7)[0], max_new_tokens=2, do_sample=False)[0]
        layers = rt.num_layers
    with SessionStore.open(tmp_path / "a" / "store") as store:
        keys = store.get("chat").key_digests()  # block-major
    blocks = (len(turn) - 1) // 16
    assert len(keys) == blocks * layers
    name = RemoteStore(RemoteConfig(url=redis_server.url)).block_name(keys[5 * layers + 1], position_groups(keys, layers))
    assert redis.Redis.from_url(redis_server.url).delete(name) == 1  # block 5, layer 1
    more = torch.tensor([1, 2])
    with caplog.at_level(logging.WARNING), wrap(model, _config(model, tmp_path, "b", redis_server.url)) as rt:
        with rt.session("chat") as session:
            assert session.kv_tokens == 5 * 16  # the local record ends before the missing block
            out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
        stats = rt.stats()
    assert "1 of its %d blocks are missing there" % blocks in caplog.text
    after = len(turn) - blocks * 16  # the stored tail and the last token (whose KV was never computed)
    assert stats.prompt_tokens == 16 + after + len(more) - 1  # the missing block, those, the new turn
    assert stats.extra["reused_tokens"] == (blocks - 6) * 16  # the blocks after it, adopted
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()


def test_the_server_down_costs_nothing_local(tiny_lm, tmp_path: Path, redis_server, caplog) -> None:
    model = tiny_lm()
    redis_server.stop()
    config = _config(model, tmp_path, "a", redis_server.url)
    config = config.model_copy(update={"remote": config.remote.model_copy(update={"timeout_s": 0.2})})
    with caplog.at_level(logging.WARNING), wrap(model, config) as rt:
        for turn in range(3):
            with rt.session("chat") as session:
                session.generate(prompt(30, seed=turn)[0], max_new_tokens=2, do_sample=False)
    assert caplog.text.count("is unreachable") == 1  # logged once per outage
    with wrap(model, config) as rt, rt.session("chat") as session:
        assert len(session.tokens) == 3 * 32
    redis_server.start()  # back: the next commit is pushed
    with wrap(model, config) as rt, rt.session("chat") as session:
        session.generate(torch.tensor([5]), max_new_tokens=1, do_sample=False)
    assert redis.Redis.from_url(redis_server.url).exists("hkv:s:{chat}")


def test_sessions_ls_says_where_each_session_is(tiny_lm, tmp_path: Path, redis_server, cli) -> None:
    model = tiny_lm()
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as rt, rt.session("shared") as session:
        session.generate(prompt(40)[0], max_new_tokens=2, do_sample=False)
    config_b = _config(model, tmp_path, "b", redis_server.url)
    with wrap(model, config_b) as rt, rt.session("mine") as session:
        session.generate(prompt(40, seed=2)[0], max_new_tokens=2, do_sample=False)
    toml = tmp_path / "b.toml"
    toml.write_text(config_b.to_toml())

    def where() -> dict[str, str]:
        listed = cli("sessions", "ls", "--config", str(toml))
        assert listed.exit_code == 0, listed.output
        return {line.split()[0]: line.split()[-1] for line in listed.output.splitlines()[1:]}

    assert where() == {"mine": "both", "shared": "remote"}  # "mine" was pushed after its commit
    with wrap(model, config_b) as rt, rt.session("shared"):
        pass
    assert where() == {"mine": "both", "shared": "both"}
    redis_server.stop()
    listed = cli("sessions", "ls", "--config", str(toml))
    assert listed.exit_code == 0 and "unreachable" in listed.output and "where" not in listed.output


def test_machines_take_turns_on_one_conversation(tiny_lm, tmp_path: Path, redis_server) -> None:
    """A, then B, then A again: each opening pulls the other's newer commit."""
    model = tiny_lm()
    config_a, config_b = _config(model, tmp_path, "a", redis_server.url), _config(model, tmp_path, "b", redis_server.url)
    turns = [prompt(100, seed=11)[0], torch.tensor([7, 8, 9]), torch.tensor([4, 5])]
    whole = torch.empty(0, dtype=torch.long)
    for turn, config in zip(turns, (config_a, config_b, config_a)):
        with wrap(model, config) as rt, rt.session("chat") as session:
            assert session.tokens.tolist() == whole.tolist()
            whole = session.generate(turn, max_new_tokens=3, do_sample=False)[0]
    expected = baseline(model, torch.cat([turns[0]]).unsqueeze(0), 3)[0]
    for turn in turns[1:]:
        expected = baseline(model, torch.cat([expected, turn]).unsqueeze(0), 3)[0]
    assert whole.tolist() == expected.tolist()


def test_a_prefix_one_machine_stored_is_not_prefilled_by_another(tiny_lm, tmp_path: Path, redis_server) -> None:
    model = tiny_lm()
    document = prompt(320, seed=12)[0]
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as rt, rt.session("reader") as session:
        session.append(document)
    question = torch.tensor([9, 9, 9])
    with wrap(model, _config(model, tmp_path, "b", redis_server.url)) as rt:
        out = rt.generate(torch.cat([document, question]).unsqueeze(0), max_new_tokens=4, do_sample=False)
        reused = rt.stats().extra["reused_tokens"]
    assert reused == 319 // 16 * 16  # every block the session sealed (its KV is all but the last token) came from the server
    assert out.tolist() == baseline(model, torch.cat([document, question]).unsqueeze(0), 4).tolist()


@pytest.mark.parametrize("pull", ["lazy", "whole"])
def test_a_store_of_format_2_pulls_fp16_summaries_as_fp32(tiny_lm, tmp_path: Path, redis_server, pull: str) -> None:
    """Machine a (format 4) pushes fp16 summary rows; machine b's store keeps records in LMDB
    (``store.segments = false``: format 2, which an older hkv reads) and widens every row it
    pulls to fp32; the conversation resumes token-identical."""
    model = tiny_lm()
    first = prompt(300, seed=15)[0]
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as rt, rt.session("chat") as session:
        assert rt.manager.store.compact_summaries
        turn = session.generate(first, max_new_tokens=4, do_sample=False)[0]
    pushed = redis.Redis.from_url(redis_server.url)
    row_bytes = {len(pushed.get(key)) for key in pushed.keys("hkv:m:*")}
    floats = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    assert row_bytes == {8 + 2 * floats}  # fp16 on the server
    config = _config(model, tmp_path, "b", redis_server.url)
    config = config.model_copy(update={"store": config.store.model_copy(update={"segments": False}),
                                       "remote": config.remote.model_copy(update={"pull": pull})})  # fmt: skip
    more = torch.tensor([10, 20, 30])
    with wrap(model, config) as rt:
        assert not rt.manager.store.compact_summaries and rt.manager.store.format_version == 2
        with rt.session("chat") as session:
            out = session.generate(more, max_new_tokens=4, do_sample=False)[0]
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 4)[0].tolist()
    with SessionStore.open(tmp_path / "b" / "store") as store, store.disk.reading() as txn:
        sizes = {len(value) for _, value in txn.items("summaries")}
    assert sizes == {8 + 4 * floats}  # pulled rows widened, and the rows of b's own new blocks fp32
