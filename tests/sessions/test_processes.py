"""Sessions across processes: a SmolLM2 conversation of > 2K tokens resumed by another process
(slow), kill -9 at random points while a process appends and commits (>= 20 trials, slow), and a
session stored by another process after this one opened the store.

The children are this file run as a script (``python tests/sessions/test_processes.py MODE ...``),
so the parent and the children build the same models and configs from the same code.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # tests/: the helpers, in the children too

KILL_TRIALS = 20
CHUNK_TOKENS = 37  # tokens appended (and committed) per iteration of the kill child
LAYERS = 2


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _child(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# ---------------------------------------------------------------------------------------------
# kill -9 during saves (tiny random model; slow: 20 trials, each a forked child, 11-32 s here)


def _kill_model():
    from helpers.models import tiny_lm

    return tiny_lm("llama", layers=LAYERS, seed=0)  # both sides build the same weights


def _kill_config(model, path):
    from hkv import Config

    from helpers.models import block_bytes

    size = block_bytes(model)
    return Config(
        tiers={"device": (LAYERS * 3 + 4) * size, "host": 6 * size, "disk": 64 * 2**20, "path": str(path)},
        attention={"mode": "exact", "block_tokens": 16, "sink_tokens": 16, "local_tokens": 32, "budget_tokens": 96,
                   "prefill_chunk_tokens": 64},
        prefetch={"enabled": True, "workers": 2},
    )  # fmt: skip


def _chunks(seed: int):
    """The token ids the kill child appends, chunk after chunk (the parent regenerates them)."""
    rng = np.random.default_rng(seed)
    while True:
        yield torch.from_numpy(rng.integers(0, 256, CHUNK_TOKENS, dtype=np.int64))


def kill_child(store: str, seed: int, out_fd: int) -> None:
    """Append and commit forever, writing ``saving N`` to ``out_fd`` before each commit and
    ``committed N`` after it returns."""
    from hkv import wrap

    model = _kill_model()
    with wrap(model, _kill_config(model, store)) as rt, rt.session("k", autocommit=False) as s:
        for chunk in _chunks(seed):
            s.append(chunk)  # its blocks are written through now
            os.write(out_fd, f"saving {len(s.tokens)}\n".encode())
            s.commit()
            os.write(out_fd, f"committed {len(s.tokens)}\n".encode())


def zygote() -> None:
    """Serve kill trials without paying the torch / transformers import per process: per stdin
    line ``STORE SEED SAVES FRACTION``, fork a child (a new process that opens the store itself)
    running :func:`kill_child`, SIGKILL it after it starts its ``SAVES``-th commit, ``FRACTION``
    x 1.5 x its mean commit time so far later (so most kills land in a save or in the blocks'
    write-through, whatever the machine's speed), reap it and print one
    JSON line ``{"counts": [...], "signal": N, "in_save": bool}``. The zygote itself never opens a store and
    runs single-threaded, so forking it is safe."""
    import traceback

    import torch

    torch.set_num_threads(1)
    import hkv.integrations.runtime  # noqa: F401  (imported once, inherited by every child)
    import hkv.sessions  # noqa: F401
    import helpers.models  # noqa: F401
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        store, seed, saves, fraction = line.split()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: write until killed
            os.close(read)
            try:
                kill_child(store, int(seed), write)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write)
        with os.fdopen(read) as pipe:
            lines, seen, began, took = [], 0, 0.0, []
            while seen < int(saves):
                lines.append(pipe.readline())
                if not lines[-1]:
                    break  # the child died by itself
                if lines[-1].startswith("saving"):
                    seen, began = seen + 1, time.perf_counter()
                else:
                    took.append(time.perf_counter() - began)
            if seen == int(saves):
                time.sleep(float(fraction) * 1.5 * sum(took) / max(1, len(took)))
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            lines += pipe.read().splitlines()
        counts = [int(text.split()[1]) for text in lines if text.startswith("committed")]
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
        saving = bool(lines) and lines[-1].startswith("saving")  # killed between "saving" and "committed"
        print(json.dumps({"counts": counts, "signal": signum, "in_save": saving}), flush=True)


def _kill_trials(tmp_path: Path, seeds: list[int]) -> tuple[list[list[int]], int]:
    """Run the trials in a zygote: the committed counts each child printed before its kill -9,
    and how many were killed inside a commit call."""
    log = (tmp_path / "zygote.err").open("w+")
    proc = subprocess.Popen(_child("zygote"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=_env(),
                            cwd=ROOT, text=True)  # fmt: skip
    printed, in_save = [], 0
    try:
        ready = proc.stdout.readline()
        assert ready.strip() == "ready", f"zygote failed: {ready!r}"
        for seed in seeds:
            rng = random.Random(seed)
            saves, fraction = rng.randint(2, 4), rng.random()
            proc.stdin.write(f"{tmp_path / f's{seed}'} {seed} {saves} {fraction:.4f}\n")
            proc.stdin.flush()
            result = json.loads(proc.stdout.readline())
            if result["signal"] != signal.SIGKILL or not result["counts"]:
                log.seek(0)
                raise AssertionError(f"trial {seed}: the child was not killed while committing ({result}):\n{log.read()[-4000:]}")
            printed.append(result["counts"])
            in_save += result["in_save"]
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        log.close()
    return printed, in_save


@pytest.mark.slow
def test_kill_during_commit_leaves_old_or_new_state(tmp_path):
    from transformers import DynamicCache

    from hkv import wrap

    seeds = list(range(100, 100 + KILL_TRIALS))
    started = time.perf_counter()
    printed, in_save = _kill_trials(tmp_path, seeds)
    killed_s = time.perf_counter() - started
    model = _kill_model()
    states = []
    for seed, counts in zip(seeds, printed):
        config = _kill_config(model, tmp_path / f"s{seed}")
        with wrap(model, config) as rt:
            store = rt.session_store()
            report = store.verify()
            assert report.ok, f"trial {seed}: {report.problems}"
            record = store.get("k")
            last = counts[-1]
            assert len(record.token_ids) in (last, last + CHUNK_TOKENS), f"trial {seed}: printed {counts}, stored {len(record.token_ids)}"
            chunks = _chunks(seed)
            expected = torch.cat([next(chunks) for _ in range(len(record.token_ids) // CHUNK_TOKENS)])
            assert np.array_equal(np.asarray(record.token_ids), expected.numpy()), f"trial {seed}: stored tokens differ"
            states.append(len(record.token_ids) - last)
            with rt.session("k") as s:  # the lock died with the child; the KV restores
                assert s.restored.pending_tokens == 0 and s.restored.kv_tokens == len(expected) - 1
                out = s.generate(torch.tensor([1, 2, 3]), max_new_tokens=3, do_sample=False)
        ids = torch.cat([expected, torch.tensor([1, 2, 3])]).unsqueeze(0)
        with torch.inference_mode():
            base = model.generate(ids, max_new_tokens=3, do_sample=False, cache=DynamicCache(config=model.config))
        assert torch.equal(out, base), f"trial {seed}: resumed session diverged"
    print(f"{KILL_TRIALS} kill trials: kills {killed_s:.1f} s, checks {time.perf_counter() - started - killed_s:.1f} s; "
          f"{in_save} killed inside a commit call, {states.count(CHUNK_TOKENS)} of them after its transaction")  # fmt: skip
    assert in_save >= KILL_TRIALS // 5, "too few kills landed inside a commit: the test would not test much"


# ---------------------------------------------------------------------------------------------
# a session stored by another process after this one opened the store (tiny model, fast)

OTHER_TOKENS = 150


def other_child(store: str) -> None:
    """Create session ``x`` (``OTHER_TOKENS`` tokens) in the store, then exit."""
    from hkv import wrap

    from helpers.models import prompt

    model = _kill_model()
    with wrap(model, _kill_config(model, store)) as rt, rt.session("x") as s:
        s.append(prompt(OTHER_TOKENS, seed=1))


@pytest.mark.slow  # about 10 s on an idle 2-core machine
def test_session_stored_by_another_process_is_resumed_and_kept(tmp_path):
    from transformers import DynamicCache

    from hkv import wrap

    from helpers.models import prompt

    model = _kill_model()
    config = _kill_config(model, tmp_path / "s")
    with wrap(model, config) as rt, rt.session("mine") as s:
        s.append(prompt(40, seed=2))
    with wrap(model, config) as rt:  # opens the existing store now: it knows the blocks stored so far
        done = subprocess.run(_child("other", str(tmp_path / "s")), env=_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-4000:]
        store = rt.session_store()
        assert store.get("x").kv_tokens == OTHER_TOKENS - 1
        with rt.session("x") as s:  # blocks stored after this runtime opened the store are learned, not recomputed
            assert s.restored.tokens == OTHER_TOKENS
            assert (s.restored.kv_tokens, s.restored.pending_tokens) == (OTHER_TOKENS - 1, 0)
        assert store.get("x").kv_tokens == OTHER_TOKENS - 1
        assert store.verify("x").ok
        with rt.session("x") as s:
            out = s.generate(torch.tensor([1, 2, 3]), max_new_tokens=3, do_sample=False)
        assert store.verify().ok
    ids = torch.cat([prompt(OTHER_TOKENS, seed=1)[0], torch.tensor([1, 2, 3])]).unsqueeze(0)
    with torch.inference_mode():
        base = model.generate(ids, max_new_tokens=3, do_sample=False, cache=DynamicCache(config=model.config))
    assert torch.equal(out, base)
    with wrap(model, config) as rt, rt.session("x") as s:
        assert s.restored.kv_tokens == OTHER_TOKENS + 5 and s.restored.pending_tokens == 0


# ---------------------------------------------------------------------------------------------
# SmolLM2: a conversation of > 2K tokens continued by another process (slow)

SMOL_TOKENS = 2100
SMOL_NEW = 6


def _smol_config(path):
    from hkv import Config

    # 30 layers x 3 KV heads x 64 dims fp32: 96 KiB per 64-token block and layer, ~95 MiB of KV
    # for 2K tokens; the device and host tiers hold about three quarters of it, the rest spills.
    return Config(
        tiers={"device": "24MiB", "host": "48MiB", "disk": "1GiB", "path": str(path)},
        attention={"mode": "exact", "block_tokens": 64, "sink_tokens": 64, "local_tokens": 256,
                   "prefill_chunk_tokens": 2048},
        prefetch={"enabled": True, "workers": 2},
    )  # fmt: skip


def _smol_turns(tokenizer):
    from hkv.passkey import passkey_prompt

    first, key = passkey_prompt(tokenizer, SMOL_TOKENS, 0.4, seed=3)
    second = tokenizer.encode(" Again: what is the pass key? The pass key is", add_special_tokens=False)
    return torch.tensor(first), torch.tensor(second), key


def smol_child(role: str, store: str, out: str) -> None:
    """``first``: turn 1 (committed), then turn 2 without committing, in one process;
    ``resume``: open the session committed by ``first`` and answer turn 2."""
    from hkv import wrap
    from hkv.default_model import load_default_model

    model, tokenizer = load_default_model()
    first, second, key = _smol_turns(tokenizer)
    result: dict[str, object] = {"key": key}
    with wrap(model, _smol_config(store)) as rt:
        with rt.session("long", tokenizer=tokenizer) as s:
            if role == "first":
                result["turn1"] = s.generate(first, max_new_tokens=SMOL_NEW, do_sample=False)[0].tolist()
                s.autocommit = False  # the store keeps turn 1 only; turn 2 continues in this process
            else:
                r = s.restored
                result["restored"] = {"tokens": r.tokens, "kv_tokens": r.kv_tokens, "adopted_blocks": r.adopted_blocks,
                                      "pending_tokens": r.pending_tokens, "seconds": r.seconds}  # fmt: skip
            started = time.perf_counter()
            result["turn2"] = s.generate(second, max_new_tokens=SMOL_NEW, do_sample=False)[0].tolist()
            result["turn2_s"] = time.perf_counter() - started
        stats = rt.stats()
        result["disk_blocks"] = stats.tiers["disk"]["blocks"]
        result["device_capacity"] = stats.tiers["device"]["capacity_bytes"]
    Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_smollm2_conversation_resumed_by_another_process(smollm2_installed, tmp_path):
    pytest.importorskip("transformers")
    store = tmp_path / "store"
    results = {}
    for role in ("first", "resume"):
        out = tmp_path / f"{role}.json"
        done = subprocess.run(_child("smol", role, str(store), str(out)), env=_env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=float(os.environ.get("SMOL_CHILD_TIMEOUT_S", 170)))  # fmt: skip
        assert done.returncode == 0, f"{role} child failed:\n{done.stderr[-4000:]}"
        results[role] = json.loads(out.read_text())
    first, resumed = results["first"], results["resume"]
    turn1 = first["turn1"]
    assert len(turn1) >= 2048 + SMOL_NEW
    restored = resumed["restored"]
    assert restored["tokens"] == len(turn1) and restored["kv_tokens"] == len(turn1) - 1
    assert restored["pending_tokens"] == 0 and restored["adopted_blocks"] == (len(turn1) - 1) // 64
    assert resumed["turn2"] == first["turn2"], "the resumed process continued differently"
    assert resumed["turn2"][: len(turn1)] == turn1
    assert first["disk_blocks"] >= 30 * (len(turn1) // 64), "the KV must live in the store"
    print(f"resumed {restored['kv_tokens']} tokens of KV in {restored['seconds']:.2f} s; turn 2 took "
          f"{first['turn2_s']:.1f} s uninterrupted, {resumed['turn2_s']:.1f} s resumed")  # fmt: skip


# ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    if argv[0] == "zygote":
        zygote()
    elif argv[0] == "smol":
        smol_child(argv[1], argv[2], argv[3])
    elif argv[0] == "other":
        other_child(argv[1])
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
