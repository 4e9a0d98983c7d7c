"""The lazy pull of a remote session (``remote.pull = "lazy"``, issue 19) on a real redis-server:
a second "machine" opens another's session with none of its blocks local, fetches them when
attention needs them (batched), commits the session locally once every block is there, and stays
token-identical to ``model.generate`` when a block vanishes from the server after the open, when
the server goes down after the open, and after a kill -9 in the middle of a pull.

The child process of the kill test is this file run as a script (``python
tests/remote/test_lazy_pull.py opener FOLDER URL``)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # tests/: the helpers, in the child too

from hkv import wrap  # noqa: E402
from hkv.blocks import BlockKey, BlockLayout, decode_into  # noqa: E402
from hkv.config import Config, ConfigError, RemoteConfig  # noqa: E402
from hkv.remote.client import RemoteStore  # noqa: E402
from hkv.sessions import SessionStore  # noqa: E402
from hkv.sessions.remote import position_groups  # noqa: E402

from helpers.models import baseline, prompt, tiny_lm, wrap_config  # noqa: E402

TOKENS = 600  # the first machine's conversation: 37 blocks of 16 tokens, 2 layers


def _config(model, folder: Path, url: str, *, mode: str = "sparse", pull: str = "lazy", timeout_s: float = 2.0) -> Config:
    config = wrap_config(model, folder, mode=mode)
    remote = config.remote.model_copy(update={"url": url, "lease_s": 5.0, "pull": pull, "timeout_s": timeout_s})
    return config.model_copy(update={"remote": remote})


def _first_machine(model, tmp_path: Path, url: str, seed: int = 11, mode: str = "sparse") -> torch.Tensor:
    with wrap(model, _config(model, tmp_path / "a", url, mode=mode)) as rt, rt.session("chat") as session:
        return session.generate(prompt(TOKENS, seed=seed)[0], max_new_tokens=2, do_sample=False)[0]


def _verify(folder: Path) -> list[str]:
    """Verify a local store (must be clean); its sessions."""
    with SessionStore.open(folder / "store") as store:
        report = store.verify()
        assert report.ok, report.problems
        return store.names()


def _block_names(url: str, tmp_path: Path) -> tuple[list[str], int]:
    """The server's keys of the first machine's blocks (block-major) and its layers."""
    with SessionStore.open(tmp_path / "a" / "store") as store:
        record = store.get("chat")
        keys, layers = record.key_digests(), record.num_layers
    remote = RemoteStore(RemoteConfig(url=url))
    groups = position_groups(keys, layers)
    return [remote.block_name(key, groups) for key in keys], layers


@pytest.mark.parametrize("pull", ["lazy", "whole"])
def test_a_remote_session_resumes_token_identical_either_way(tmp_path: Path, redis_server, pull: str) -> None:
    model = tiny_lm()
    turn = _first_machine(model, tmp_path, redis_server.url)
    more = torch.tensor([7, 8, 9])
    with wrap(model, _config(model, tmp_path / "b", redis_server.url, pull=pull)) as rt, rt.session("chat") as session:
        assert (session._lazy is not None) == (pull == "lazy")
        out = session.generate(more, max_new_tokens=4, do_sample=False)[0]
        assert session._lazy is None  # the turn's commit made the session local
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 4)[0].tolist()
    assert _verify(tmp_path / "b") == ["chat"]


def _resume(model, folder: Path, url: str, more: torch.Tensor, *, mode: str, pull: str) -> list[int]:
    """A turn on another "machine", not committed (nothing pushed): the whole conversation."""
    with wrap(model, _config(model, folder, url, mode=mode, pull=pull)) as rt, rt.session("chat", autocommit=False) as session:
        return session.generate(more, max_new_tokens=3, do_sample=False)[0].tolist()


def _same_blocks(model, tmp_path: Path, recomputed: int | None = None) -> int:
    """Every block the second machine's session references holds the KV the first machine
    stored under its key (a recomputed one up to float reduction order); how many were compared.
    ``recomputed``: a position whose layers past 0 are left out (sparse attention: their KV
    depends on the attention's block selection, which a recompute makes over other context)."""
    c = model.config
    layout = BlockLayout(c.num_key_value_heads, 16, c.hidden_size // c.num_attention_heads, torch.float32)
    mine, theirs = torch.empty(layout.shape), torch.empty(layout.shape)
    with SessionStore.open(tmp_path / "b" / "store") as b, SessionStore.open(tmp_path / "a" / "store") as a:
        record = b.get("chat")
        keys = record.key_digests()
        with b.disk.reading() as tb, a.disk.reading() as ta:
            for i, key in enumerate(keys):
                decode_into(tb.record(key), mine, BlockKey(key), where="b")
                raw = ta.record(key)
                position, layer = divmod(i, record.num_layers)
                if raw is not None and not (position == recomputed and layer > 0):
                    decode_into(raw, theirs, BlockKey(key), where="a")
                    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    return len(keys)


def test_a_lazy_open_reads_only_what_attention_needs_in_batches(tmp_path: Path, redis_server) -> None:
    """Sparse attention: the turn fetches the blocks it selects, a layer's in one read, and
    gives the tokens a whole pull gives (bitwise the same blocks and summaries)."""
    model = tiny_lm()
    turn = _first_machine(model, tmp_path, redis_server.url)
    more = torch.tensor([1, 2, 3])
    expected = _resume(model, tmp_path / "c", redis_server.url, more, mode="sparse", pull="whole")
    config = _config(model, tmp_path / "b", redis_server.url)
    with wrap(model, config) as rt:
        with rt.session("chat", autocommit=False) as session:
            lazy = session._lazy
            total = len(lazy.remote_keys)
            assert total == (len(turn) - 1) // 16 * 2  # nothing was local
            opened = lazy.fetched_blocks
            assert 0 < opened < total // 2  # the pinned sink and local blocks only
            store = rt.session_store()  # nothing references a block that is not local
            assert store.names() == [] and store.verify().ok
            lazy.start_background = lambda: None  # this test counts the turn's own reads
            out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
            assert lazy.fetched_blocks < total  # sparse attention: the selected blocks only
            assert lazy.fetched_blocks / lazy.fetch_calls >= 2  # a layer's blocks come in one read
        # closing without a commit: the rest is fetched and the pulled record committed locally
    assert out.tolist() == expected
    assert _verify(tmp_path / "b") == ["chat"]
    redis_server.stop()  # the session is local now: it opens without the server
    offline = config.model_copy(update={"remote": config.remote.model_copy(update={"timeout_s": 0.2})})
    with wrap(model, offline) as rt, rt.session("chat") as session:
        assert session.tokens.tolist() == turn.tolist() and session.kv_tokens == len(turn) - 1


@pytest.mark.parametrize("mode", ["exact", "sparse"])
def test_a_block_that_vanishes_after_the_open_is_recomputed(tmp_path: Path, redis_server, caplog, mode: str) -> None:
    """Deleted on the server after the open, before the turn: exact attention reads it in the
    turn (the turn reruns after a whole pull); sparse attention may not, and the commit's pull of
    the rest finds it gone (the session's KV is refilled after the whole pull). Either way the
    stored session is right: exact attention over it continues as ``model.generate``."""
    model = tiny_lm()
    turn = _first_machine(model, tmp_path, redis_server.url, mode=mode)
    names, layers = _block_names(redis_server.url, tmp_path)
    more = torch.tensor([4, 5, 6])
    with caplog.at_level(logging.WARNING), wrap(model, _config(model, tmp_path / "b", redis_server.url, mode=mode)) as rt:
        with rt.session("chat") as session:
            assert session._lazy is not None
            assert redis.Redis.from_url(redis_server.url).delete(names[10 * layers + 1]) == 1  # block 10, layer 1
            out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
        stats = rt.stats()
    assert "could not be read" in caplog.text and "pulled whole" in caplog.text
    assert stats.prompt_tokens >= 16  # the lost block's tokens were computed again
    if mode == "exact":
        assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()
    assert _verify(tmp_path / "b") == ["chat"]
    assert _same_blocks(model, tmp_path, recomputed=10 if mode == "sparse" else None) >= (len(turn) - 1) // 16 * layers


def test_the_server_down_after_a_lazy_open_recomputes(tmp_path: Path, redis_server, caplog) -> None:
    model = tiny_lm()
    turn = _first_machine(model, tmp_path, redis_server.url, mode="exact")
    more = torch.tensor([9, 9])
    config = _config(model, tmp_path / "b", redis_server.url, mode="exact", timeout_s=0.3)
    with caplog.at_level(logging.WARNING), wrap(model, config) as rt, rt.session("chat") as session:
        assert session._lazy is not None
        redis_server.stop()
        out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
    assert caplog.text.count("is unreachable") == 1
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()
    assert _verify(tmp_path / "b") == ["chat"]


def test_two_lazy_sessions_sharing_a_prefix_when_the_server_goes_down(tmp_path: Path, redis_server, caplog) -> None:
    """"one" and "two" share 320 tokens (20 blocks). Both open lazily in one process (the shared
    blocks registered with "one"'s pull); the server dies. "one" recovers first (its whole pull
    finds nothing: its tokens are recomputed, the shared blocks too, which "two" references:
    the manager takes the computed data for them); "two" recovers in turn. Both continue exactly."""
    model = tiny_lm()
    shared = prompt(320, seed=3)[0]
    with wrap(model, _config(model, tmp_path / "a", redis_server.url, mode="exact")) as rt:
        turns = {}
        for name, seed in (("one", 4), ("two", 5)):
            with rt.session(name) as session:
                turns[name] = session.generate(torch.cat([shared, prompt(100, seed=seed)[0]]), max_new_tokens=2, do_sample=False)[0]
    more = torch.tensor([8, 1])
    config = _config(model, tmp_path / "b", redis_server.url, mode="exact", timeout_s=0.3)
    with caplog.at_level(logging.WARNING), wrap(model, config) as rt:
        one, two = rt.session("one"), rt.session("two")
        pull_one = one._lazy
        assert pull_one is not None and two._lazy is not None
        redis_server.stop()
        out_one = one.generate(more, max_new_tokens=3, do_sample=False)[0]
        assert one._lazy is None and not rt.manager.remote_blocks.pending(pull_one)  # recomputed by "one", "two"'s too
        out_two = two.generate(more, max_new_tokens=3, do_sample=False)[0]
        assert caplog.text.count("pulled whole") == 2
        one.close()
        two.close()
    for turn, out in ((turns["one"], out_one), (turns["two"], out_two)):
        assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()
    assert _verify(tmp_path / "b") == ["one", "two"]


def opener(folder: str, url: str) -> None:
    """The kill test's child: open "chat" lazily, run a turn (its reads only), print each fetch."""
    model = tiny_lm()
    with wrap(model, _config(model, Path(folder), url)) as rt, rt.session("chat", autocommit=False) as session:
        lazy = session._lazy
        fetch = lazy.fetch

        def traced(keys: list[bytes]):
            records, written = fetch(keys)
            os.write(1, f"fetched {len(records)}\n".encode())
            return records, written

        lazy.fetch = traced
        lazy.start_background = lambda: None  # the turn's own reads only: killed with the pull partly done
        session.generate(torch.tensor([1]), max_new_tokens=1, do_sample=False)
        rt.manager.flush()  # the fetched blocks' writes into the local store are durable
        os.write(1, b"waiting\n")
        signal.pause()


@pytest.mark.slow  # a child process loads torch and transformers: ~10 s here
def test_a_kill_9_in_the_middle_of_a_lazy_pull_leaves_a_clean_store(tmp_path: Path, redis_server, cli) -> None:
    model = tiny_lm()
    turn = _first_machine(model, tmp_path, redis_server.url)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, __file__, "opener", str(tmp_path / "b"), redis_server.url], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)  # fmt: skip
    try:
        fetched = 0
        for line in child.stdout:
            if line.startswith("fetched"):
                fetched += int(line.split()[1])
            if line.startswith("waiting"):
                break
        else:
            pytest.fail(f"the child ended: {child.stderr.read()[-3000:]}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    total = (len(turn) - 1) // 16 * 2
    assert 0 < fetched < total  # killed with the pull partly done
    assert _verify(tmp_path / "b") == []  # unreferenced blocks only: no record names a block that is not there
    local = str(tmp_path / "b" / "store")
    checked = cli("sessions", "verify", "--store", local)
    assert checked.exit_code == 0, checked.output
    repaired = cli("sessions", "repair", "--store", local)
    assert repaired.exit_code == 0 and "nothing to repair" in repaired.output, repaired.output
    redis.Redis.from_url(redis_server.url).delete("hkv:lease:{chat}")  # the killed process's lease, expired (lease_s)
    more = torch.tensor([3, 1])
    with wrap(model, _config(model, tmp_path / "b", redis_server.url)) as rt, rt.session("chat") as session:
        assert fetched <= total - len(session._lazy.remote_keys) < total  # what the killed pull brought is not fetched again
        out = session.generate(more, max_new_tokens=3, do_sample=False)[0]
    assert out.tolist() == baseline(model, torch.cat([turn, more]).unsqueeze(0), 3)[0].tolist()
    collected = cli("sessions", "gc", "--store", local)
    assert collected.exit_code == 0, collected.output
    assert _verify(tmp_path / "b") == ["chat"]
    with SessionStore.open(local) as store:
        assert store.info("chat").missing_blocks == 0  # gc kept every block the session references


def test_remote_pull_is_validated(tmp_path: Path, cli) -> None:
    assert RemoteConfig(pull="whole").pull == "whole" and RemoteConfig().pull == "lazy"
    with pytest.raises((ConfigError, ValueError), match="pull"):
        Config.load(None, env={}, remote={"pull": "eager"})
    toml = tmp_path / "bad.toml"
    toml.write_text('[remote]\nurl = "redis://127.0.0.1:6379/0"\npull = "eager"\n')
    checked = cli("config", "check", str(toml))
    assert checked.exit_code == 2 and "remote.pull = 'eager'" in checked.output and "'lazy' or 'whole'" in checked.output


if __name__ == "__main__":
    if sys.argv[1] == "opener":
        opener(*sys.argv[2:])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
