"""A damaged LMDB page (issue 16): whatever page is hit, the user sees a StoreError naming the
store (or the data still reads back intact), never a raw ``lmdb`` exception.

Each case runs in a forked child, so that LMDB aborting the process (an assertion in mdb.c)
is counted instead of ending the test run."""

from __future__ import annotations

import faulthandler
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

import torch

from hkv.blocks import BlockKey, BlockLayout, RecordError
from hkv.errors import TierError
from hkv.store.block_store import BlockStore

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
PAGE = 4096
FLAGS_AT = 10  # LMDB page header: pgno u64, pad u16, flags u16
BLOCKS = 300  # enough for branch pages in the block and key databases


def _key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def _outcome(path: Path) -> int:
    """0: every block reads back intact; 1: a TierError (StoreError...) or a RecordError named the
    damage; 2: anything else."""
    try:
        with BlockStore.open_existing(path) as disk:
            keys = list(disk.keys())
            out = torch.empty(LAYOUT.shape, dtype=LAYOUT.dtype)
            for i in range(BLOCKS):
                disk.get_into(_key(i), out)
                if not bool((out == i % 100).all()):
                    return 2
            return 0 if len(keys) == BLOCKS and not disk.verify() else 1
    except (TierError, RecordError) as error:  # RecordError: a record's own checks named the block
        return 1 if str(path) in str(error) or "block" in str(error) else 2
    except BaseException:  # noqa: BLE001 -- a raw error is the failure this test counts
        return 2


def _damage_each_page(tmp_path: Path, spots: Callable[[int], list[tuple[int, int]]]) -> tuple[int, dict[str, int], list]:
    """For each page but the meta pages, and each ``(offset, xor mask)`` of ``spots(page)``: a
    copy of the store with that byte changed, opened and read in a forked child."""
    store = tmp_path / "store"
    with BlockStore(store, LAYOUT, 1 << 24) as disk:
        disk.put_many([_key(i) for i in range(BLOCKS)], torch.stack([torch.full(LAYOUT.shape, float(i % 100), dtype=LAYOUT.dtype)
                                                                     for i in range(BLOCKS)]))  # fmt: skip
    pages = (store / "data.mdb").stat().st_size // PAGE
    outcomes: dict[str, int] = {"intact": 0, "named": 0, "raw": 0, "signal": 0}
    bad = []
    for page in range(2, pages):  # 0 and 1 are the meta pages (their damage: tests/store/test_store_files.py)
        for offset, mask in spots(page):
            copy = tmp_path / "copy"
            shutil.copytree(store, copy)
            with open(copy / "data.mdb", "r+b") as data:
                data.seek(page * PAGE + offset)
                byte = data.read(1)[0]
                data.seek(page * PAGE + offset)
                data.write(bytes([byte ^ mask]))
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                faulthandler.disable()  # a crash is counted by the parent, not dumped
                os._exit(_outcome(copy))
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                outcomes["signal"] += 1
                bad.append((page, offset, signal.Signals(os.WTERMSIG(status)).name))
            else:
                code = os.WEXITSTATUS(status)
                outcomes[("intact", "named", "raw")[code]] += 1
                if code == 2:
                    bad.append((page, offset, "raw error"))
            shutil.rmtree(copy)
    return pages - 2, outcomes, bad


def test_a_flipped_page_flag_in_any_page_never_gives_a_raw_lmdb_error(tmp_path: Path) -> None:
    pages, outcomes, bad = _damage_each_page(tmp_path, lambda page: [(FLAGS_AT, 0x03)])  # branch <-> leaf, or a free page made one
    print(f"{pages} pages damaged: {outcomes}")
    assert outcomes["raw"] == 0 and outcomes["signal"] == 0, bad  # the page check (hkv/store/pages.py)
    assert outcomes["named"] > 0  # the test damages pages that matter


@pytest.mark.slow  # ~15 s: 8 damaged copies of each of 42 pages, each read in a forked child
def test_a_flipped_byte_anywhere_in_any_page_never_crashes(tmp_path: Path) -> None:
    """The header bytes (page number, flags, free-space bounds, first node offset) and 3 random
    bytes of each page, each flipped in its own copy: a clear error or intact data, never a
    signal or a raw error (issue 16's target: a flipped byte in every page)."""
    rng = random.Random(16)
    header = [(0, 0x01), (FLAGS_AT, 0x01), (12, 0x10), (14, 0x08), (16, 0x20)]
    pages, outcomes, bad = _damage_each_page(tmp_path, lambda page: header + [(rng.randrange(18, PAGE), 0x40) for _ in range(3)])
    print(f"{pages} pages x 8 bytes damaged: {outcomes}")
    assert outcomes["raw"] == 0 and outcomes["signal"] == 0, bad
