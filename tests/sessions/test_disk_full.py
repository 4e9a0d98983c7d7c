"""A full disk (issue 16): the turn that does not fit fails naming the disk, every earlier turn
resumes token-exact, `hkv sessions rm` and `gc` work on the full disk, the store verifies, and a
new turn fits again after the delete.

The store lives on a small tmpfs mounted for the test (needs root, as in CI); skipped with the
reason where the machine does not let tests mount one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hkv import wrap
from hkv.errors import DiskFullError

from helpers.models import baseline, prompt, wrap_config
from helpers.mounts import tmpfs

FS_BYTES = 7 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "fs", FS_BYTES) as mount:
        yield mount


def test_a_full_disk_fails_the_turn_by_name_and_rm_gc_free_it(tiny_lm, small_disk: Path, tmp_path: Path, cli) -> None:
    model = tiny_lm(hidden_size=256, num_key_value_heads=4)  # 32 KiB blocks: the disk fills in a few turns
    config = wrap_config(model, tmp_path)
    config = config.model_copy(update={"tiers": config.tiers.model_copy(update={"path": str(small_disk / "store"), "disk": 6 << 20})})
    store = small_disk / "store"
    turns: dict[str, torch.Tensor] = {}
    with wrap(model, config) as rt:
        for i in range(40):
            ids = prompt(300, seed=i)[0]
            try:
                with rt.session(f"s{i}") as session:
                    turns[f"s{i}"] = session.generate(ids, max_new_tokens=2, do_sample=False)[0]
            except DiskFullError as error:
                assert "the disk is full" in str(error) and str(store) in str(error) and "hkv sessions rm" in str(error)
                failed = f"s{i}"
                break
        else:
            pytest.fail("the disk never filled")
    assert len(turns) >= 3
    listed = cli("sessions", "ls", "--store", str(store))
    assert listed.exit_code == 0 and failed not in listed.output.split()  # the failed turn was not committed
    # every committed turn is there, on the full disk
    with wrap(model, config) as rt:
        for name, tokens in turns.items():
            with rt.session(name) as session:
                assert session.tokens.tolist() == tokens.tolist()
    # rm and gc on the full disk
    removed = cli("sessions", "rm", "s1", "--yes", "--store", str(store))
    assert removed.exit_code == 0, removed.output
    collected = cli("sessions", "gc", "--store", str(store))
    assert collected.exit_code == 0 and collected.output.startswith("gc: "), collected.output
    checked = cli("sessions", "verify", "--store", str(store))
    assert checked.exit_code == 0, checked.output
    # the earlier turns go on token-exact, in the room rm freed
    with wrap(model, config) as rt:
        for name in ("s0", f"s{len(turns) - 1}"):
            with rt.session(name) as session:
                out = session.generate(torch.tensor([7, 8, 9]), max_new_tokens=3, do_sample=False)[0]
            whole = torch.cat([turns[name], torch.tensor([7, 8, 9])]).unsqueeze(0)
            assert out.tolist() == baseline(model, whole, 3)[0].tolist()
    with wrap(model, config) as rt, rt.session(failed) as session:  # and a new one
        session.generate(prompt(100, seed=99)[0], max_new_tokens=2, do_sample=False)
    assert cli("sessions", "verify", "--store", str(store)).exit_code == 0
