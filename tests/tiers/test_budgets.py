"""Budgets checked against the machine when the tiers are built, errors naming the key (issue 16)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from hkv.blocks import BlockLayout
from hkv.config import Config, ConfigError
from hkv.errors import TierError
from hkv.store.files import filesystem_bytes
from hkv.tiers.manager import TierManager

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)


def _manager(tmp_path: Path, **tiers: object) -> TierManager:
    return TierManager(Config(tiers={"path": str(tmp_path / "store"), "host": "1MiB", "device": "1MiB", **tiers}), LAYOUT,
                       device="cpu")  # fmt: skip


@pytest.mark.parametrize("device", ["1EiB", "64TiB"])
def test_a_device_budget_beyond_memory_names_tiers_device(tmp_path: Path, device: str) -> None:
    with pytest.raises(TierError, match=r"tiers\.device = \d+ bytes .* does not fit"):
        _manager(tmp_path, device=device)


def test_a_device_budget_beyond_the_ram_left_names_tiers_device(tmp_path: Path) -> None:
    too_much = psutil.virtual_memory().available + (1 << 30)
    with pytest.raises(TierError, match=r"tiers\.device"):
        _manager(tmp_path, device=too_much)


def test_a_host_budget_beyond_memory_names_tiers_host(tmp_path: Path) -> None:
    with pytest.raises(TierError, match=r"tiers\.host = \d+ bytes .* does not fit"):
        _manager(tmp_path, host="1EiB")


@pytest.mark.parametrize("disk", ["8EiB", None])
def test_a_disk_budget_beyond_the_filesystem_names_tiers_disk(tmp_path: Path, disk: str | None) -> None:
    budget = disk if disk is not None else filesystem_bytes(tmp_path) + (1 << 30)
    with pytest.raises(ConfigError, match=r"tiers\.disk = \d+ bytes .* larger than the whole filesystem"):
        _manager(tmp_path, disk=budget)
    assert not (tmp_path / "store").exists()


def test_budgets_that_fit_still_build(tmp_path: Path) -> None:
    with _manager(tmp_path, disk="64MiB") as manager:
        assert manager.stats().tiers["device"].capacity_bytes == 1 << 20
