"""Strict config types and a `config show` that always loads again (issue 16)."""

from __future__ import annotations

import tomllib

import pytest

from hkv.config import Config, ConfigError


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"tiers": {"device": True}}, "tiers.device = True"),
        ({"tiers": {"disk": 1.5}}, "tiers.disk = 1.5"),
        ({"tiers": {"host": 2.0e9}}, "tiers.host = 2000000000.0"),
        ({"prefetch": {"enabled": "yes"}}, "prefetch.enabled = 'yes'"),
        ({"prefetch": {"workers": 1.0}}, "prefetch.workers = 1.0"),
        ({"prefetch": {"margin": True}}, "prefetch.margin = True"),
        ({"store": {"persist": 1}}, "store.persist = 1"),
        ({"attention": {"block_tokens": 64.0}}, "attention.block_tokens = 64.0"),
    ],
)
def test_no_silent_coercion(data: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")):
        Config(**data)


def test_environment_values_are_typed_like_toml() -> None:
    config = Config.load(env={"HKV_PREFETCH__ENABLED": "false", "HKV_PREFETCH__WORKERS": "3", "HKV_TIERS__HOST": "1GiB"})
    assert config.prefetch.enabled is False and config.prefetch.workers == 3 and int(config.tiers.host) == 2**30
    with pytest.raises(ConfigError, match="prefetch.enabled = 'yes'"):
        Config.load(env={"HKV_PREFETCH__ENABLED": "yes"})


@pytest.mark.parametrize("path", ["with\nnewline", 'quote " and \\ backslash', "tab\there\x7fdel", "ünïcode/ok"])
def test_config_show_output_loads_again(path: str) -> None:
    config = Config(tiers={"path": path})
    again = Config(**tomllib.loads(config.to_toml()))
    assert again == config and str(again.tiers.path) == str(config.tiers.path)
