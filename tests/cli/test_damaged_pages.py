"""`hkv sessions` on a 3-session store with one LMDB page damaged (issue 16's target): for each
page, its flags byte and one random byte flipped, each in its own copy: `ls`, `verify`,
`repair` and `gc` never die by a signal and never print a traceback; each exits 0 or names the
damage in one error line.

Each case runs in a forked child, so that a crash is counted instead of ending the test run."""

from __future__ import annotations

import faulthandler
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hkv.cli.app import app
from hkv.sessions.store import SessionStore
from hkv.tiers.disk import DiskTier

from helpers.records import LAYOUT, REC, ids_of, save

PAGE = 4096
COMMANDS = (["ls"], ["show", "a"], ["verify"], ["repair"], ["gc"], ["ls"])


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


@pytest.mark.slow  # ~25 s: 96 damaged copies x 6 commands, each copy in a forked child
def test_cli_on_a_damaged_page_never_crashes_nor_prints_a_traceback(tmp_path: Path) -> None:
    store = tmp_path / "store"
    _store(store)
    pages = (store / "data.mdb").stat().st_size // PAGE
    rng = random.Random(16)
    crashes, tracebacks = [], []
    cases = 0
    for page in range(2, pages):
        for offset, mask in ((10, 0x03), (rng.randrange(16, PAGE), 0x40)):
            copy = tmp_path / "copy"
            shutil.copytree(store, copy)
            with open(copy / "data.mdb", "r+b") as data:
                data.seek(page * PAGE + offset)
                byte = data.read(1)[0]
                data.seek(page * PAGE + offset)
                data.write(bytes([byte ^ mask]))
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                faulthandler.disable()
                os._exit(_child(copy))
            _, status = os.waitpid(pid, 0)
            cases += 1
            if os.WIFSIGNALED(status):
                crashes.append((page, offset, signal.Signals(os.WTERMSIG(status)).name))
            elif os.WEXITSTATUS(status):
                tracebacks.append((page, offset))
            shutil.rmtree(copy)
    print(f"{cases} damaged copies of {pages - 2} pages: {len(crashes)} crashes, {len(tracebacks)} tracebacks")
    assert not crashes and not tracebacks, (crashes, tracebacks)
