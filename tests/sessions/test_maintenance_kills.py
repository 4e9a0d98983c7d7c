"""kill -9 during `hkv sessions gc` and `repair` (issue 16), 20 trials each: the store opens,
verifies and its sessions read back after every kill, and running the command again finishes it.

Each trial forks a child that runs the command on a fresh copy of the store and kills it with
SIGKILL at a random time within the command's measured duration."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hkv.blocks import BlockKey
from hkv.sessions.repair import repair
from hkv.sessions.store import SessionStore
from hkv.store.block_store import usage_from_index
from hkv.store.maintenance import collect_garbage
from hkv.tiers.disk import DiskTier

from helpers.records import LAYOUT, REC, block_for, ids_of, raw_env, save

TRIALS = 20
ORPHANS = 1500  # blocks no session references: several transactions of gc / repair


def _store(path: Path, unindexed: bool) -> dict[str, int]:
    """Three sessions sharing a prefix and ORPHANS unreferenced blocks (``unindexed``: half of
    them missing from the key index, which repair puts back; the store still verifies, as
    ``hkv sessions verify`` checks the sessions' blocks); the sessions' token counts. Records go
    to segment files (gc then compacts them: kills land in the compaction too), except with
    ``unindexed``: only a record in LMDB can be indexed again (store.segments = false)."""
    disk = DiskTier(path, LAYOUT, (ORPHANS + 100) * REC, writer_batch=64, segments=not unindexed)
    store = SessionStore(disk)
    sessions = {"a": 40, "b": 44, "c": 48}
    for i, (name, n) in enumerate(sessions.items()):
        save(store, name, [*ids_of(16), *ids_of(n - 16, 1000 * (i + 1))], n - 1)
    orphans = [BlockKey(i.to_bytes(4, "little") * 4) for i in range(ORPHANS)]
    for start in range(0, ORPHANS, 250):
        chunk = orphans[start : start + 250]
        disk.put_many(chunk, torch.stack([block_for(key) for key in chunk]))
    disk.close()
    if unindexed:
        env = raw_env(path)
        with env.begin(write=True) as txn:
            keys = env.open_db(b"keys", txn=txn)
            for key in orphans[::2]:
                txn.delete(bytes(key), db=keys)
            usage = usage_from_index(txn, keys)  # the row agrees with the index: the store verifies
            txn.put(b"usage", json.dumps(usage).encode(), db=env.open_db(b"meta", txn=txn))
        env.close()
    return sessions


def _run(path: Path, command: Callable[[SessionStore], object]) -> None:
    with SessionStore.open(path, exclusive=True) as store:
        command(store)


def _child(path: Path, command: Callable[[SessionStore], object]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _run(path, command)
        finally:
            os._exit(0)
    return pid


def _blocks(path: Path) -> tuple[int, int]:
    """(records, key index entries) of the store: records in LMDB plus those the index places in
    segment files (20-byte entries)."""
    with SessionStore.open(path) as store, store.disk.reading() as txn:
        placed = sum(1 for _, entry in txn.items("keys") if len(entry) != 8)
        return len(txn.keys("blocks")) + placed, len(txn.keys("keys"))


def _referenced(path: Path) -> int:
    with SessionStore.open(path) as store:
        return len({key for name in store.names() for key in store.get(name).key_digests()})


def _check(path: Path, sessions: dict[str, int]) -> None:
    with SessionStore.open(path) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert {info.name: info.tokens for info in store.list()} == sessions


@pytest.mark.slow  # ~15 s: 2 x 20 forked runs killed at random
@pytest.mark.parametrize("name", ["gc", "repair"])
def test_kill_9_during_gc_and_repair_loses_nothing(tmp_path: Path, name: str) -> None:
    command = {"gc": lambda store: collect_garbage(store.disk), "repair": repair}[name]
    original = tmp_path / "original"
    sessions = _store(original, unindexed=name == "repair")
    # gc keeps the sessions' blocks; repair every record (half of the orphans indexed again)
    expected = (_referenced(original), _referenced(original)) if name == "gc" else (_blocks(original)[0], _blocks(original)[0])
    timing = tmp_path / "timing"
    shutil.copytree(original, timing)
    started = time.perf_counter()
    os.waitpid(_child(timing, command), 0)
    duration = time.perf_counter() - started
    rng = random.Random(16)
    killed_mid_run = 0
    for trial in range(TRIALS):
        copy = tmp_path / f"trial{trial}"
        shutil.copytree(original, copy)
        pid = _child(copy, command)
        time.sleep(rng.uniform(0.0, duration))
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if not finished:
            os.kill(pid, signal.SIGKILL)
            killed_mid_run += 1
        os.waitpid(pid, 0) if not finished else None
        _check(copy, sessions)  # opens, verifies, every session reads back
        _run(copy, command)  # and the command finishes on a second run
        _check(copy, sessions)
        assert _blocks(copy) == expected
        shutil.rmtree(copy)
    print(f"{name}: {killed_mid_run} of {TRIALS} runs killed mid-run (a full run takes {duration * 1000:.0f} ms)")
    assert killed_mid_run >= TRIALS // 2
