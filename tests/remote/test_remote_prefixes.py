"""Blocks outside sessions on the remote tier (issue 19, ``remote.prefixes``): what a plain
``rt.generate`` stores (``store.persist``) is pushed, and another machine's prompt with the same
prefix adopts it instead of prefilling it; off by default; the config refuses it without
``store.persist``."""

from __future__ import annotations

from pathlib import Path

import redis
import torch

from hkv import Config, wrap

from helpers.models import baseline, prompt, wrap_config


def _config(model, tmp_path: Path, machine: str, url: str, **remote) -> Config:
    return Config.load(wrap_config(model, tmp_path / machine), remote={"url": url, **remote}, store={"persist": True})


def test_a_prompt_one_machine_generated_is_adopted_by_another(tiny_lm, tmp_path: Path, redis_server) -> None:
    model = tiny_lm()
    document = prompt(320, seed=21)[0]  # 20 whole blocks
    first = torch.cat([document, torch.tensor([1, 2, 3])])
    with wrap(model, _config(model, tmp_path, "a", redis_server.url, prefixes=True, sessions=False)) as rt:
        out = rt.generate(first.unsqueeze(0), max_new_tokens=4, do_sample=False)
        with rt.session("local-only") as session:  # sessions = false: the session stays here
            session.append(prompt(40, seed=22)[0])
    sealed = (len(first) + 4 - 1) // 16  # the KV of every token but the last
    client = redis.Redis.from_url(redis_server.url)
    assert len(client.keys("hkv:b:*")) == sealed * model.config.num_hidden_layers
    assert not client.keys("hkv:s:*")
    question = torch.cat([document, torch.tensor([9, 8, 7])]).unsqueeze(0)
    with wrap(model, _config(model, tmp_path, "b", redis_server.url, prefixes=True)) as rt:  # an empty local store
        answer = rt.generate(question, max_new_tokens=4, do_sample=False)
        stats = rt.stats()
    assert stats.extra["reused_tokens"] == len(document)
    assert stats.prompt_tokens == question.shape[1] - 1 - len(document)
    assert answer.tolist() == baseline(model, question, 4).tolist()
    assert out.tolist() == baseline(model, first.unsqueeze(0), 4).tolist()


def test_without_prefixes_plain_generations_stay_local(tiny_lm, tmp_path: Path, redis_server) -> None:
    model = tiny_lm()
    with wrap(model, _config(model, tmp_path, "a", redis_server.url)) as rt:
        rt.generate(prompt(100, seed=23), max_new_tokens=2, do_sample=False)
    assert not redis.Redis.from_url(redis_server.url).keys("hkv:*")


def test_config_check_names_bad_prefixes_values(cli, tmp_path: Path) -> None:
    path = tmp_path / "hkv.toml"
    path.write_text('[remote]\nurl = "redis://127.0.0.1:6379/0"\nprefixes = true\n')
    result = cli("config", "check", str(path))
    assert result.exit_code == 2 and "remote.prefixes = true" in result.output and "store.persist" in result.output
    path.write_text('[remote]\nprefixes = "yes"\n')
    result = cli("config", "check", str(path))
    assert result.exit_code == 2 and "remote.prefixes = 'yes'" in result.output
    path.write_text('[remote]\nurl = "redis://127.0.0.1:6379/0"\nprefixes = true\n[store]\npersist = true\n')
    assert cli("config", "check", str(path)).exit_code == 0
