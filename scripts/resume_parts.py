"""Where a cold resume's time goes (docs/benchmarks.md, ``hkv bench resume``).

Builds a conversation of ``--tokens`` tokens with synthetic KV in a session of a store in a
temporary folder (as ``hkv bench resume --fill synthetic --weights random`` does), then, in a
fresh process, drops the store's pages from the page cache and resumes it as the benchmark does
(``hkv.wrap``, ``rt.session``, the first token of a 12-token turn), with wall-clock timers
around the steps below and Python's garbage collections counted. Prints seconds per step; the
steps nest (``wrap`` holds the store's open, ``restore`` the summary runs and the adoption), so
they do not add up to the total.

    python scripts/resume_parts.py [--tokens 262144]
"""

from __future__ import annotations

import argparse
import compileall
import functools
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hkv.bench import resume as bench
from hkv.bench.disk import drop_store_pages
from hkv.config import Config

# (module, attribute path, label): the steps timed
STEPS = [
    ("hkv.integrations.runtime", "Runtime.__init__", "wrap"),
    ("hkv.store.block_store", "check_store_files", "  the store's page check"),
    ("hkv.tiers.manager", "TierManager._learn_disk_keys", "  learning the stored blocks"),
    ("hkv.sessions.session", "Session._restore", "restore"),
    ("hkv.sessions.store", "SessionStore.read_summary_runs", "  summary runs"),
    ("hkv.store.block_store", "BlockStore.read_large_values", "    their reads"),
    ("hkv.sessions.session", "adopt_stored_prefix", "  adopting the blocks"),
    ("hkv.attention.selection", "BlockSummaries.extend", "    summaries into place"),
    ("hkv.integrations.runtime", "Runtime.generate_with", "the turn (first token)"),
    ("hkv.store.block_store", "BlockStore.get_many_into", "block reads (pins and the turn)"),
    ("hkv.store.linux_aio", "_Kernel.submit", "  io_submit"),
    ("hkv.store.linux_aio", "_Kernel.getevents", "  waiting for them (io_getevents)"),
]


def _timed(seconds: dict[str, float], label: str, function: Any) -> Any:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

    return timed


def _install(seconds: dict[str, float]) -> None:
    import importlib

    for module_name, path, label in STEPS:
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, name, _timed(seconds, label, getattr(owner, name)))


def child(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    model, _, _ = bench._build_model("random", spec["max_tokens"])  # noqa: SLF001 (the benchmark's own model)
    config = Config.load(spec["config"])
    new = torch.from_numpy(np.load(spec["new"]))
    seconds: dict[str, float] = {}
    _install(seconds)
    collections: list[tuple[int, float]] = []
    started: list[float] = []

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            collections.append((info["generation"], time.perf_counter() - started.pop()))

    gc.collect()  # the model load's collection, as the benchmark runs it before timing
    print("pages dropped:", drop_store_pages(Path(spec["store"])))
    gc.callbacks.append(on_collection)
    total, opened, _, _ = bench._resume_once(model, config, Path(spec["store"]), new)  # noqa: SLF001
    gc.callbacks.remove(on_collection)
    print(f"{'resume (wrap + session + first token)':<40} {total:7.3f} s")
    print(f"{'  of which the open (wrap + session)':<40} {opened:7.3f} s")
    for _, _, label in STEPS:
        print(f"{label:<40} {seconds.get(label, 0.0):7.3f} s")
    full = [s for generation, s in collections if generation == 2]
    print(f"{'garbage collections':<40} {sum(s for _, s in collections):7.3f} s ({len(collections)}, of which "
          f"{len(full)} full: {sum(full):.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    compileall.compile_dir(Path(bench.__file__).resolve().parents[1], quiet=2)  # as the benchmark does
    with tempfile.TemporaryDirectory(prefix="hkv-resume-parts-") as folder:
        work = Path(folder)
        model, _, _ = bench._build_model("random", args.tokens + 64)  # noqa: SLF001
        config = bench.default_config(model, args.tokens)
        ids, new = bench.conversation_ids(None, model.config.vocab_size, args.tokens)
        print(f"building {args.tokens} tokens: {bench.build_session(model, config, work / 'store', ids, 'synthetic'):.1f} s")
        np.save(work / "new.npy", new)
        spec = {"max_tokens": args.tokens + 64, "config": config.as_dict(), "store": str(work / "store"),
                "new": str(work / "new.npy")}  # fmt: skip
        (work / "spec.json").write_text(json.dumps(spec))
        del model
        subprocess.run([sys.executable, __file__, "--child", str(work / "spec.json")], check=True)


if __name__ == "__main__":
    main()
