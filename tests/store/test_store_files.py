"""The store's files checked before LMDB maps them (issue 16): truncation, links, concurrent creation."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hkv.blocks import BlockKey, BlockLayout
from hkv.cli.app import app
from hkv.errors import StoreError
from hkv.store.block_store import BlockStore
from hkv.store.files import check_store_files, needed_bytes

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
PAGE = 4096


def _key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def _block(i: int) -> torch.Tensor:
    return torch.full(LAYOUT.shape, float(i), dtype=LAYOUT.dtype)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A closed store of 40 blocks (a few dozen pages)."""
    path = tmp_path / "store"
    with BlockStore(path, LAYOUT, 1 << 22) as disk:
        disk.put_many([_key(i) for i in range(40)], torch.stack([_block(i) for i in range(40)]))
    return path


def test_truncation_at_every_page_is_an_error_or_harmless(store: Path, tmp_path: Path) -> None:
    data = store / "data.mdb"
    need, size = needed_bytes(data)
    assert need <= size and size % PAGE == 0
    errors = 0
    for cut in range(0, size, PAGE):
        copy = tmp_path / f"cut{cut}"
        shutil.copytree(store, copy)
        os.truncate(copy / "data.mdb", cut)
        try:
            with BlockStore.open_existing(copy) as disk:  # a truncation past the pages in use is harmless
                assert disk.verify() == [], cut
                assert cut >= need
        except StoreError as error:
            errors += 1
            assert cut < need and "data.mdb" in str(error), (cut, str(error))
            assert ("truncated" in str(error)) or ("empty" in str(error)) or ("meta page" in str(error)), str(error)
        shutil.rmtree(copy)
    assert errors == need // PAGE  # every cut below the pages in use is refused, none crashes


def test_a_store_truncated_to_nothing_is_not_silently_recreated(store: Path) -> None:
    os.truncate(store / "data.mdb", 0)
    with pytest.raises(StoreError, match="empty"):
        BlockStore(store, LAYOUT, 1 << 22)
    assert (store / "data.mdb").stat().st_size == 0  # nothing was written over it


def test_cli_names_a_truncated_store_in_one_line(store: Path) -> None:
    os.truncate(store / "data.mdb", 2 * PAGE + 100)
    result = CliRunner().invoke(app, ["sessions", "ls", "--store", str(store)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "truncated" in lines[0] and "data.mdb" in lines[0], result.output


@pytest.mark.parametrize("name", ["lock.mdb", "data.mdb", "sessions.lock"])
def test_links_inside_the_store_are_refused_and_their_targets_untouched(store: Path, tmp_path: Path, name: str) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    (store / name).unlink(missing_ok=True)
    (store / name).symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        check_store_files(store)
    with pytest.raises(StoreError, match="symbolic link"):
        BlockStore.open_existing(store)
    if name != "data.mdb":
        with pytest.raises(StoreError, match="symbolic link"):
            BlockStore(store, LAYOUT, 1 << 22)
    assert target.read_bytes() == b"precious"


def test_a_dangling_sessions_lock_link_creates_nothing_outside(store: Path, tmp_path: Path) -> None:
    from hkv.sessions.store import SessionStore

    outside = tmp_path / "outside.lock"
    (store / "sessions.lock").unlink(missing_ok=True)
    (store / "sessions.lock").symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        with SessionStore.open(store, readonly=False) as sessions:
            sessions.lock("chat")
    assert not outside.exists()


def _create_and_put(path: str, i: int) -> str:
    try:
        with BlockStore(path, LAYOUT, 1 << 22) as disk:
            disk.put(_key(i), _block(i))
        return "ok"
    except Exception as error:  # noqa: BLE001 -- reported to the parent
        return f"{type(error).__name__}: {error}"


def test_processes_creating_one_store_at_once(tmp_path: Path) -> None:
    path = tmp_path / "new" / "store"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.starmap(_create_and_put, [(str(path), i) for i in range(8)])
    assert results == ["ok"] * 8
    with BlockStore.open_existing(path) as disk:
        assert sorted(disk.keys()) == sorted(_key(i) for i in range(8)) and disk.used_bytes() == 8 * LAYOUT.record_nbytes


@pytest.mark.parametrize("row", [None, b"{not json", b'{"used_bytes": -5, "blocks": 40}', b'{"used_bytes": "x"}', b"[1, 2]"])
def test_a_garbled_or_missing_usage_row_costs_a_scan_not_the_store(store: Path, row: bytes | None) -> None:
    import lmdb

    env = lmdb.open(str(store), max_dbs=8)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        if row is None:
            txn.delete(b"usage", db=meta)
        else:
            txn.put(b"usage", row, db=meta)
    env.close()
    with BlockStore.open_existing(store, readonly=False) as disk:
        assert len(disk) == 40 and disk.used_bytes() == 40 * LAYOUT.record_nbytes
        assert "usage" in disk.usage_problem()
        disk.put(_key(99), _block(99))  # the next write stores the row again
        assert disk.usage_problem() is None and len(disk) == 41
    result = CliRunner().invoke(app, ["sessions", "verify", "--store", str(store)])
    assert result.exit_code == 0, result.output


def test_verify_notices_a_usage_row_that_disagrees_with_the_index(store: Path) -> None:
    import lmdb

    env = lmdb.open(str(store), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"usage", b'{"used_bytes": 7, "blocks": 1}', db=env.open_db(b"meta", txn=txn))
    env.close()
    result = CliRunner().invoke(app, ["sessions", "verify", "--store", str(store)])
    assert result.exit_code == 1 and "meta/usage row says" in result.output, result.output
