"""`hkv sessions` on a damaged 3-session store (issue 16's targets): for each page, its flags
byte and one random byte flipped, and the file truncated at every 4 KiB boundary, each in its
own copy: `ls`, `show`, `verify`, `repair` and `gc` never die by a signal and never print a
traceback; each exits 0 or names the damage in one error line.

Each case runs in a forked child, so that a crash is counted instead of ending the test run."""

from __future__ import annotations

import faulthandler
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hkv.cli.app import app
from hkv.sessions.store import SessionStore
from hkv.tiers.disk import DiskTier

from helpers.records import LAYOUT, REC, ids_of, save

PAGE = 4096
COMMANDS = (["ls"], ["verify"], ["repair"], ["gc"])  # (show reads what ls reads)


def _store(path: Path) -> None:
    disk = DiskTier(path, LAYOUT, 512 * REC, writer_batch=16)
    store = SessionStore(disk)
    for i, name in enumerate("abc"):  # a shared prefix of 32 tokens, then their own
        save(store, name, [*ids_of(32), *ids_of(60, 1000 * (i + 1))], 91)
    disk.close()


def _child(store: Path) -> int:
    """0: every command exited 0 or with one clean error line; 3: a traceback or another code."""
    runner = CliRunner()
    for command in COMMANDS:
        result = runner.invoke(app, ["sessions", *command, "--store", str(store)], env={})
        clean = result.exception is None or isinstance(result.exception, SystemExit)
        if "Traceback" in result.output or not clean or result.exit_code not in (0, 1):
            return 3
        if result.exit_code == 1 and not any(line.startswith("error:") or ": " in line for line in result.output.splitlines()):
            return 3
    return 0


@pytest.mark.slow  # ~30 s: 146 damaged copies x 4 commands, each copy in a forked child
def _flip(offset: int, mask: int) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        with open(data, "r+b") as file:
            file.seek(offset)
            byte = file.read(1)[0]
            file.seek(offset)
            file.write(bytes([byte ^ mask]))

    return damage


def _truncate(size: int) -> Callable[[Path], None]:
    return lambda data: os.truncate(data, size)


def test_cli_on_a_damaged_page_never_crashes_nor_prints_a_traceback(tmp_path: Path) -> None:
    """Each page's flags byte and a random byte flipped, and the file cut at every 4 KiB
    boundary, each in its own copy."""
    store = tmp_path / "store"
    _store(store)
    pages = (store / "data.mdb").stat().st_size // PAGE
    rng = random.Random(16)
    cases = [(f"page {page} byte {offset}", _flip(page * PAGE + offset, mask))
             for page in range(2, pages) for offset, mask in ((10, 0x03), (rng.randrange(16, PAGE), 0x40))]  # fmt: skip
    cases += [(f"cut at {cut}", _truncate(cut)) for cut in range(0, pages * PAGE, PAGE)]
    crashes, tracebacks = [], []
    for what, damage in cases:
        copy = tmp_path / "copy"
        shutil.copytree(store, copy)
        damage(copy / "data.mdb")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            faulthandler.disable()
            os._exit(_child(copy))
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            crashes.append((what, signal.Signals(os.WTERMSIG(status)).name))
        elif os.WEXITSTATUS(status):
            tracebacks.append(what)
        shutil.rmtree(copy)
    print(f"{len(cases)} damaged copies ({pages - 2} pages x 2 bytes, {pages} cuts): {len(crashes)} crashes, {len(tracebacks)} tracebacks")
    assert not crashes and not tracebacks, (crashes, tracebacks)
