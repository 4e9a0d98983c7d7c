"""Config: sources, precedence, byte sizes and every error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from hkv import BlockLayout, Config, ConfigError
from hkv.config import env_overrides


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hkv.toml"
    path.write_text(text)
    return path


def test_defaults_run_without_a_gpu_and_are_consistent() -> None:
    config = Config()
    assert config.tiers.accelerator == "auto"
    assert int(config.tiers.device) < int(config.tiers.host) < int(config.tiers.disk)
    assert config.attention.budget_tokens >= config.attention.sink_tokens + config.attention.local_tokens
    assert Config.load(env={}) == config


def test_toml_file_with_byte_sizes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [tiers]
        device = "64MiB"
        host = "1.5GiB"
        disk = 1000000000
        path = "{tmp_path / 'store'}"
        [attention]
        mode = "exact"
        block_tokens = 32
        sink_tokens = 32
        local_tokens = 64
        budget_tokens = 512
        [prefetch]
        enabled = false
        """,
    )
    config = Config.load(path, env={})
    assert int(config.tiers.device) == 64 * 2**20
    assert int(config.tiers.host) == int(1.5 * 2**30)
    assert int(config.tiers.disk) == 10**9
    assert config.tiers.path == tmp_path / "store"
    assert config.attention.mode == "exact" and config.attention.block_tokens == 32
    assert config.prefetch.enabled is False


def test_precedence_file_then_overrides_then_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[tiers]\nhost = "1GiB"\ndevice = "32MiB"\n')
    config = Config.load(path, tiers={"device": "16MiB"}, env={"HKV_TIERS__HOST": "3GiB", "HKV_PREFETCH__WORKERS": "4"})
    assert int(config.tiers.host) == 3 * 2**30
    assert int(config.tiers.device) == 16 * 2**20
    assert config.prefetch.workers == 4


def test_env_values_parse_as_toml_scalars() -> None:
    assert env_overrides({"HKV_PREFETCH__ENABLED": "false", "HKV_TIERS__HOST": "8GiB", "OTHER": "x"}) == {
        "prefetch": {"enabled": False},
        "tiers": {"host": "8GiB"},
    }


def test_round_trip_through_toml(tmp_path: Path) -> None:
    config = Config.load({"tiers": {"host": "3GiB", "path": str(tmp_path)}, "attention": {"mode": "exact"}}, env={})
    assert Config.load(write(tmp_path, config.to_toml()), env={}) == config


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"tiers": {"hots": "1GiB"}}, "tiers.hots: unknown key"),
        ({"cache": {}}, "cache: unknown key"),
        ({"tiers": {"host": -5}}, "tiers.host = -5"),
        ({"tiers": {"device": 0}}, "tiers.device = 0"),
        ({"tiers": {"disk": "lots"}}, "tiers.disk = 'lots'"),
        ({"tiers": {"dtype": "int8"}}, "tiers.dtype = 'int8'"),
        ({"tiers": {"accelerator": "tpu"}}, "tiers.accelerator = 'tpu'"),
        ({"tiers": {"policy": "mru"}}, "tiers.policy = 'mru'"),
        ({"attention": {"mode": "fast"}}, "attention.mode = 'fast'"),
        ({"attention": {"block_tokens": 48}}, "attention.block_tokens = 48"),
        ({"attention": {"block_tokens": 0}}, "attention.block_tokens = 0"),
        ({"attention": {"sink_tokens": 10}}, "sink_tokens = 10 must be a multiple of block_tokens"),
        ({"attention": {"budget_tokens": 128}}, "budget_tokens = 128 must be at least"),
        ({"attention": {"local_tokens": -64}}, "attention.local_tokens = -64"),
        ({"attention": {"prefill_chunk_tokens": 0}}, "attention.prefill_chunk_tokens = 0"),
        ({"prefetch": {"workers": 0}}, "prefetch.workers = 0"),
        ({"prefetch": {"job_blocks": 0}}, "prefetch.job_blocks = 0"),
        ({"prefetch": {"margin": -1}}, "prefetch.margin = -1"),
        ({"prefetch": {"enabled": "maybe"}}, "prefetch.enabled = 'maybe'"),
        ({"store": {"writer_batch": 0}}, "store.writer_batch = 0"),
        ({"tiers": "big"}, "tiers = 'big'"),
    ],
)
def test_bad_values_name_key_and_value(data: dict, named: str) -> None:
    with pytest.raises(ConfigError, match="invalid hkv config") as error:
        Config.load(data, env={})
    assert named in str(error.value)


def test_several_problems_are_all_reported() -> None:
    with pytest.raises(ConfigError) as error:
        Config.load({"tiers": {"host": 0, "bogus": 1}, "prefetch": {"workers": 0}}, env={})
    message = str(error.value)
    assert "tiers.host" in message and "tiers.bogus" in message and "prefetch.workers" in message


def test_store_path_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    with pytest.raises(ConfigError, match="tiers.path .*not a folder"):
        Config.load({"tiers": {"path": str(file)}}, env={})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(write(tmp_path, "[tiers\nhost ="), env={})


def test_bad_environment_variables() -> None:
    with pytest.raises(ConfigError, match="HKV_HOST"):
        Config.load(env={"HKV_HOST": "1GiB"})
    with pytest.raises(ConfigError, match="tiers.hots: unknown key"):
        Config.load(env={"HKV_TIERS__HOTS": "1GiB"})
    with pytest.raises(ConfigError, match="tiers.host = 0"):
        Config.load(env={"HKV_TIERS__HOST": "0"})


def test_budget_smaller_than_one_block_names_the_key() -> None:
    layout = BlockLayout(kv_heads=3, block_tokens=64, head_dim=64)
    layout.check_budgets({"device": layout.nbytes, "host": 2**30})
    with pytest.raises(ConfigError, match=r"tiers.device = 1000 bytes: smaller than one block \(49152 bytes"):
        layout.check_budgets({"device": 1000, "host": 2**30})


def test_prefetch_auto_is_on_with_a_gpu_or_four_cores() -> None:
    from hkv.config import AUTO_PREFETCH_MIN_CORES

    auto = Config().prefetch
    assert auto.enabled == "auto"
    assert auto.on(gpu=True, cores=1) and auto.on(gpu=False, cores=AUTO_PREFETCH_MIN_CORES)
    assert not auto.on(gpu=False, cores=AUTO_PREFETCH_MIN_CORES - 1)
    assert Config(prefetch={"enabled": True}).prefetch.on(gpu=False, cores=1)
    assert not Config(prefetch={"enabled": False}).prefetch.on(gpu=True, cores=64)
    assert Config.load(env={"HKV_PREFETCH__ENABLED": "auto"}).prefetch.enabled == "auto"
