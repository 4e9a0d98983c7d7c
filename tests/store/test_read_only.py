"""A store on a read-only filesystem (issue 16 (11)): read, listed and verified; every write
refused with an error naming the path, never a raw OSError."""

from __future__ import annotations

from pathlib import Path

import pytest

from hkv.errors import StoreError
from hkv.sessions.store import SessionStore
from hkv.tiers.disk import DiskTier

from helpers.cli import assert_clean_error
from helpers.mounts import remount_read_only, tmpfs
from helpers.records import LAYOUT, REC, ids_of, save


def test_a_store_on_a_read_only_filesystem(tmp_path: Path, cli) -> None:
    with tmpfs(tmp_path / "fs", 16 << 20) as mount:
        store = mount / "store"
        disk = DiskTier(store, LAYOUT, 64 * REC)
        save(SessionStore(disk), "a", ids_of(12), 12)
        disk.close()
        remount_read_only(mount)
        listed = cli("sessions", "ls", "--store", str(store))
        assert listed.exit_code == 0 and listed.output.splitlines()[1].split()[:2] == ["a", "12"], listed.output
        assert cli("sessions", "verify", "--store", str(store)).exit_code == 0
        for command in (["rm", "a", "--yes"], ["gc"], ["repair"]):
            assert_clean_error(cli("sessions", *command, "--store", str(store)), "Read-only file system")
        with pytest.raises(StoreError, match="Read-only file system"):
            DiskTier(store, LAYOUT, 64 * REC)
        with pytest.raises(StoreError, match="cannot create the store folder .*Read-only file system"):
            DiskTier(mount / "new", LAYOUT, 64 * REC)
