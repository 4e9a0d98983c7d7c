"""``hkv bench resume``: time to first token continuing a saved conversation in a fresh process.

For each conversation length this process builds a conversation of that many tokens in a
session and commits it to a store in a temporary folder. Then a FRESH Python process (this
module run with ``--child``) loads the same model (its load time is reported apart, not
counted), and measures:

* ``resume_s``: wrap the model over the store, open the session (metadata, summaries and the
  pinned sink / local blocks are read; the other blocks stay on disk) and generate the first
  token of a short new user turn. Measured first in the process, after
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the store's files (``data.mdb`` and the segment
  files) so that their pages are (mostly) not in the page cache: a cold-ish read.
  ``resume_warm_s`` is the same again in the same process with the whole store read into the
  page cache first. Before timing, the fresh process runs Python's garbage collector once (the
  model load's collection, like the load, is not counted), and this process byte-compiles hkv
  (as installing a wheel does), so that the first ``wrap`` imports compiled modules.
* ``reprefill_s``: in the same process, a fresh runtime over another, empty store
  (``store.reuse_prefix = false``) prefills the whole conversation plus the new turn and
  generates the first token: what continuing costs without the saved KV.

The saved conversation is built either by a real prefill (``fill="real"``: the resumed first
token must then be the re-prefilled one, reported as ``same_first_token``) or, where a prefill
would take too long here, with synthetic KV of the right shape appended without a forward
(``fill="synthetic"``, as :mod:`hkv.bench.decode` does; ``same_first_token`` is then None).
The re-prefill baseline is always a real prefill of the same tokens. hkv's config is the given
one (defaults: sparse attention) with ``tiers.path`` pointed at the temporary stores.
"""

from __future__ import annotations

import argparse
import compileall
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from .disk import drop_store_pages, store_files, store_nbytes

SESSION = "bench-resume"
NEW_TURN = "\nWhat is the pass key? The pass key is"  # the continuation (real weights: tokenized)
NEW_TURN_RANDOM = 12  # tokens of the continuation with random weights
REAL_FILL_MAX = 2048  # fill="auto": a real prefill up to this many tokens, synthetic above (a real 8K
# prefill takes minutes on a 2-core CPU)
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)  # fmt: skip


@dataclass(slots=True)
class ChildResult:
    """What the fresh process measured (seconds)."""

    model_load_s: float
    resume_s: float  # cold-ish: first resume in the process, store pages dropped from the page cache
    resume_warm_s: float  # second resume, store file read into the page cache first
    open_s: float  # of resume_s: wrap + open the session (restore), before the first forward
    restored_kv_tokens: int
    pending_tokens: int
    fadvise: str  # "ok" or why it could not drop the pages
    cached_cold: float | None  # fraction of the store's files in the page cache just before the cold resume (fincore)
    loadavg: float  # 1-minute load average when the fresh process finished (other jobs on the machine)
    reprefill_s: float | None
    resume_token: int
    resume_warm_token: int
    reprefill_token: int | None


# -- model and tokens --------------------------------------------------------------------------


def _build_model(weights: str, max_tokens: int) -> tuple[torch.nn.Module, Any, str]:
    """``(model, tokenizer or None, weights used)``; deterministic for "random" and "tiny"."""
    from .smollm2 import build_model

    if weights == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_SHAPE, max_position_embeddings=max_tokens + 64)).eval()
        return model, None, "tiny"
    model, used = build_model(weights, max_tokens=max_tokens)
    tokenizer = None
    if used == "smollm2":
        from transformers import AutoTokenizer

        from ..default_model import DEFAULT_GGUF, default_model_dir

        tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)
    return model, tokenizer, used


def conversation_ids(tokenizer: Any, vocab_size: int, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(conversation [n_tokens], new turn [k])`` int64: passkey text with a tokenizer, else
    deterministic random ids."""
    if tokenizer is not None:
        from ..passkey import passkey_prompt

        ids, _ = passkey_prompt(tokenizer, n_tokens + 32, depth=0.5)  # cut before its question
        new = tokenizer.encode(NEW_TURN, add_special_tokens=False)
        return np.asarray(ids[:n_tokens], dtype=np.int64), np.asarray(new, dtype=np.int64)
    rng = np.random.default_rng(n_tokens)
    return rng.integers(0, vocab_size, n_tokens, dtype=np.int64), rng.integers(0, vocab_size, NEW_TURN_RANDOM, dtype=np.int64)


def default_config(model: torch.nn.Module, tokens: int) -> Config:
    """hkv's defaults with the host tier sized to the longest conversation's KV (capped at the
    default 2 GiB): the re-prefill keeps its KV in RAM, and a busy machine is not refused a 2 GiB
    host tier the benchmark does not need."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size() * tokens
    host = min(2 * 2**30, int(kv_bytes * 1.1) + 64 * 2**20)
    return Config.load(tiers={"host": host})


def _config(config: Config, path: Path, **store: Any) -> Config:
    return Config.load(config, env={}, tiers={"path": str(path)}, store=store)  # HKV_* already in config: the path wins


# -- building the saved conversation (this process) --------------------------------------------


def build_session(model: torch.nn.Module, config: Config, store: Path, ids: np.ndarray, fill: str) -> float:
    """Commit a session of ``ids`` in ``store``; returns the seconds it took (not a result)."""
    from ..integrations.runtime import wrap

    start = time.perf_counter()
    with wrap(model, _config(config, store)) as rt, rt.session(SESSION) as session:
        tokens = torch.from_numpy(ids)
        if fill == "real":
            session.append(tokens, progress=False)
        else:
            _synthetic_append(model, rt, session, tokens)
        session.commit()
    return time.perf_counter() - start


def _synthetic_append(model: torch.nn.Module, rt: Any, session: Any, tokens: torch.Tensor) -> None:
    """Give the session ``tokens`` with synthetic KV for all but the last (no forward pass).

    Uses the session's cache directly (``HkvCache.append_kv``, as :mod:`hkv.bench.decode` does):
    its sealed blocks are written through to the store like a prefill's, and the next commit
    records them."""
    from .decode import FILL_CHUNK
    from .smollm2 import synthetic_kv

    c = model.config
    shape = dict(kv_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
                 dtype=rt.dtype, device=rt.spec.device)  # fmt: skip
    cache, kv = session._cache, tokens[:-1]  # noqa: SLF001 (a benchmark's shortcut; Session has no public append_kv)
    for begin in range(0, kv.numel(), FILL_CHUNK):
        n = min(FILL_CHUNK, kv.numel() - begin)
        cache.append_kv(kv[begin : begin + n], lambda layer, b=begin, k=n: synthetic_kv(layer, b, k, **shape), None)
    session._tokens = torch.cat([session.tokens, tokens])  # noqa: SLF001


# -- the fresh process -------------------------------------------------------------------------


def cached_fraction(paths: list[Path]) -> float | None:
    """Fraction of the bytes of ``paths`` in the page cache (util-linux ``fincore``); None if unknown."""
    if shutil.which("fincore") is None or not paths:
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, paths)],
                          capture_output=True, text=True)  # fmt: skip
    try:
        rows = [[int(part) for part in line.split()] for line in done.stdout.splitlines() if line.strip()]
        resident, size = sum(row[0] for row in rows), sum(row[1] for row in rows)
    except (ValueError, IndexError):
        return None
    return min(1.0, resident / size) if size else None


def _read_through(paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def _resume_once(model: torch.nn.Module, config: Config, store: Path, new: torch.Tensor) -> tuple[float, float, int, Any]:
    """``(seconds to first token, seconds to open, first token, restore report)``; nothing committed."""
    from ..integrations.runtime import wrap

    start = time.perf_counter()
    with wrap(model, _config(config, store)) as rt, rt.session(SESSION, autocommit=False) as session:
        opened = time.perf_counter() - start
        out = session.generate(new[None], max_new_tokens=1, do_sample=False, progress=False)
        seconds = time.perf_counter() - start
        restored = session.restored
    return seconds, opened, int(out[0, -1]), restored


def _reprefill(model: torch.nn.Module, config: Config, store: Path, ids: torch.Tensor) -> tuple[float, int]:
    from ..integrations.runtime import wrap

    start = time.perf_counter()
    with wrap(model, _config(config, store, reuse_prefix=False)) as rt:
        out = rt.generate(ids[None], max_new_tokens=1, do_sample=False, progress=False)
        seconds = time.perf_counter() - start
    return seconds, int(out[0, -1])


def child(spec: dict[str, Any]) -> ChildResult:
    """The fresh process's measurements (``spec``: written by :func:`_run_child`)."""
    start = time.perf_counter()
    model, _, _ = _build_model(spec["weights"], spec["max_tokens"])
    model_load_s = time.perf_counter() - start
    config = Config.load(spec["config"])
    store = Path(spec["store"])
    ids = torch.from_numpy(np.load(spec["ids"]))
    new = torch.from_numpy(np.load(spec["new"]))
    # The model load's objects (~400,000) make Python's next full collection due; run it now, not
    # counted like the load, instead of inside the timed resume (0.16 s at 32K tokens).
    gc.collect()
    fadvise = drop_store_pages(store)
    cached = cached_fraction(store_files(store))
    resume_s, open_s, token, restored = _resume_once(model, config, store, new)
    _read_through(store_files(store))
    warm_s, _, warm_token, _ = _resume_once(model, config, store, new)
    reprefill_s = reprefill_token = None
    if spec["reprefill"]:
        reprefill_s, reprefill_token = _reprefill(model, config, Path(spec["baseline_store"]), torch.cat([ids, new]))
    return ChildResult(model_load_s, resume_s, warm_s, open_s, restored.kv_tokens, restored.pending_tokens, fadvise,
                       cached, os.getloadavg()[0], reprefill_s, token, warm_token, reprefill_token)  # fmt: skip


def _run_child(spec: dict[str, Any], folder: Path) -> ChildResult:
    spec_path = folder / "child.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the hkv package
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "hkv.bench.resume", "--child", str(spec_path)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"bench resume: the fresh process failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return ChildResult(**json.loads(done.stdout.strip().splitlines()[-1]))


# -- the benchmark -----------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import psutil

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_resume_bench(
    config: Config | None = None,
    *,
    tokens: tuple[int, ...] = (2048, 8192, 32768),
    weights: str = "auto",
    fill: str = "auto",
    reprefill_max: int | None = None,
    folder: Path | None = None,
) -> dict[str, Any]:
    """Resume vs re-prefill at each conversation length; returns JSON-ready figures.

    ``config``: hkv's config (its ``tiers.path`` is replaced by temporary stores); None: the
    defaults (sparse attention) with :func:`default_config`'s host tier.
    ``weights``: "auto" / "smollm2" / "random" (SmolLM2's shape) / "tiny" (a 2-layer model, for
    tests). ``fill``: "real", "synthetic" or "auto" (real up to :data:`REAL_FILL_MAX` tokens).
    ``reprefill_max``: skip the baseline (None in the figures) above this many tokens.
    ``folder``: where the temporary stores go (default: the system's temporary folder).
    Keys: ``tokens``, ``resume_s``, ``resume_warm_s``, ``reprefill_s``, ``speedup`` (lists per
    length), ``same_first_token``, ``model_load_s``, ``build_s``, ``fill``, the machine and config.
    """
    if fill not in ("auto", "real", "synthetic"):
        raise ValueError(f"fill = {fill!r}: expected 'auto', 'real' or 'synthetic'")
    if not tokens or min(tokens) < 2:
        raise ValueError(f"tokens = {tokens}: each conversation needs at least 2 tokens")
    # hkv's bytecode, as installing a wheel writes it: where PYTHONDONTWRITEBYTECODE is set (this
    # project's machines), a source checkout would otherwise compile the runtime's modules inside
    # every fresh process's timed first wrap (~0.06 s), which no installed copy pays.
    compileall.compile_dir(Path(__file__).resolve().parents[1], quiet=2)  # a read-only install: left as it is
    max_tokens = max(tokens) + 64
    model, tokenizer, used = _build_model(weights, max_tokens)
    config = config if config is not None else default_config(model, max(tokens))
    keys = ("resume_s", "resume_warm_s", "reprefill_s", "speedup", "speedup_warm", "open_s", "model_load_s", "build_s",
            "fill", "same_first_token", "restored_kv_tokens", "pending_tokens", "fadvise", "cached_cold", "loadavg", "store_bytes")  # fmt: skip
    figures: dict[str, Any] = {"tokens": list(tokens)} | {key: [] for key in keys}
    for n in tokens:
        how = fill if fill != "auto" else ("real" if n <= REAL_FILL_MAX else "synthetic")
        work = Path(tempfile.mkdtemp(prefix="hkv-bench-resume-", dir=folder))
        try:
            row = _one_length(model, tokenizer, config, used, n, how, max_tokens, reprefill_max, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for key in keys:
            figures[key].append(row[key])
    figures |= {
        "model": f"SmolLM2-135M shape ({used} weights), {next(model.parameters()).dtype}" if used != "tiny" else "tiny random Llama",
        "machine": _machine(),
        "timed": "resume_s: wrap + open session + first token of a new turn, first in a fresh process, store pages "
                 "dropped (posix_fadvise DONTNEED); reprefill_s: wrap + prefill of the whole conversation + first token, "
                 "same process, empty store; model load not counted",  # fmt: skip
        "hkv_config": {k: v for k, v in config.as_dict().items() if k in ("tiers", "attention", "prefetch", "store")},
    }
    return figures


def _one_length(model: torch.nn.Module, tokenizer: Any, config: Config, weights: str, n: int, fill: str, max_tokens: int,
                reprefill_max: int | None, work: Path) -> dict[str, Any]:  # fmt: skip
    ids, new = conversation_ids(tokenizer, model.config.vocab_size, n)
    store = work / "store"
    build_s = build_session(model, config, store, ids, fill)
    np.save(work / "ids.npy", ids)
    np.save(work / "new.npy", new)
    reprefill = reprefill_max is None or n <= reprefill_max
    spec = {"weights": weights, "max_tokens": max_tokens, "config": config.as_dict(), "store": str(store),
            "baseline_store": str(work / "baseline"), "ids": str(work / "ids.npy"), "new": str(work / "new.npy"),
            "reprefill": reprefill}  # fmt: skip
    result = _run_child(spec, work)
    same = None
    if fill == "real" and result.reprefill_token is not None:
        same = result.resume_token == result.reprefill_token == result.resume_warm_token
    base = result.reprefill_s
    return asdict(result) | {
        "build_s": build_s,
        "fill": fill,
        "speedup": base / result.resume_s if base else None,
        "speedup_warm": base / result.resume_warm_s if base else None,
        "same_first_token": same,
        "store_bytes": store_nbytes(store),
    }


def print_table(figures: dict[str, Any]) -> None:
    """The figures as a table on stdout."""

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    m = figures["machine"]
    print(f"resume vs re-prefill, {figures['model']} on {m['cpu']} ({m['cores']} cores, {m['threads']} threads)")
    print(f"timed: {figures['timed']}")
    print(f"load average during the runs: {', '.join(f'{x:.1f}' for x in figures['loadavg'])} (cores: {m['cores']})")
    print(f"{'tokens':>8} {'fill':>9} {'resume s':>9} {'warm s':>8} {'re-prefill s':>13} {'speed-up':>9} {'same token':>10} {'load s':>7}")
    for i, n in enumerate(figures["tokens"]):
        speed = figures["speedup"][i]
        print(
            f"{n:>8} {figures['fill'][i]:>9} {fmt(figures['resume_s'][i], '9.3f')} {fmt(figures['resume_warm_s'][i], '8.3f')} "
            f"{fmt(figures['reprefill_s'][i], '13.2f')} {fmt(speed, '8.1f') + ('x' if speed else ''):>9} "
            f"{fmt(figures['same_first_token'][i], ''):>10} {figures['model_load_s'][i]:7.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    """``python -m hkv.bench.resume --child SPEC``: the fresh process (prints its result as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, required=True, help="the JSON spec written by the parent process")
    args = parser.parse_args(argv)
    result = child(json.loads(args.child.read_text()))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()


@dataclass(slots=True)
class RemoteResume:
    """Seconds to the first token of a new turn: resuming from the local store (its pages
    dropped from the page cache first), and on a second "machine" whose local store is empty,
    through the remote tier: a whole pull (every block copied first, ``remote.pull = "whole"``)
    and a lazy one (``"lazy"``: the blocks the first token reads fetched on demand, the rest
    after it, outside the figure); ``ratio`` = whole / local and ``lazy_ratio`` = lazy / local
    (issue 19's target: <= 2). ``lazy_fetched`` of ``lazy_blocks``: the blocks (every layer
    counted) the lazy resume had fetched at its first token. ``same_token``: the three first
    tokens agree. ``load``: the 1-minute load average at the end."""

    tokens: int
    local_cold_s: float
    remote_s: float
    ratio: float
    lazy_s: float
    lazy_ratio: float
    lazy_fetched: int
    lazy_blocks: int
    same_token: bool
    weights: str
    url: str
    load: float


def _lazy_resume(model: torch.nn.Module, config: Config, store: Path, new: torch.Tensor) -> tuple[float, int, tuple[int, int]]:
    """``(seconds to first token, first token, (blocks fetched then, blocks to fetch))`` of a lazy
    pull; nothing committed (closing it fetches the rest, outside the figure)."""
    from ..integrations.runtime import wrap

    start = time.perf_counter()
    with wrap(model, _config(config, store)) as rt, rt.session(SESSION, autocommit=False) as session:
        session.background_pull = False  # the figure is the first token's own reads
        out = session.generate(new[None], max_new_tokens=1, do_sample=False, progress=False)
        seconds = time.perf_counter() - start
        pulled = session.pulled_blocks
        if pulled is None:
            raise RuntimeError("the session was not pulled lazily from the remote tier")
    return seconds, int(out[0, -1]), pulled


def run_remote_resume(url: str, tokens: int, *, weights: str = "random", folder: Path | None = None) -> RemoteResume:
    """Save a ``tokens``-token conversation (synthetic KV; SmolLM2's shape) with the remote tier
    at ``url``, then time the three resumes in this process (the model loaded once)."""
    model, tokenizer, used = _build_model(weights, tokens + 64)
    ids, new = conversation_ids(tokenizer, model.config.vocab_size, tokens)
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="hkv-bench-remote-")) if own else folder
    prefix = f"hkv-bench-{os.getpid()}"
    remote = {"url": url, "key_prefix": prefix, "timeout_s": 30.0}
    config = Config.load(default_config(model, tokens), env={}, remote={**remote, "pull": "whole"})
    lazy_config = Config.load(config, env={}, remote={"pull": "lazy"})
    try:
        build_session(model, config, folder / "a", ids, "synthetic")  # pushed to the server as it closes
        drop_store_pages(folder / "a")
        local_s, _, local_token, _ = _resume_once(model, config, folder / "a", torch.from_numpy(new))
        remote_s, _, remote_token, restored = _resume_once(model, config, folder / "b", torch.from_numpy(new))
        if restored.new:
            raise RuntimeError(f"the session was not found on the remote tier {url}")
        lazy_s, lazy_token, (fetched, blocks) = _lazy_resume(model, lazy_config, folder / "c", torch.from_numpy(new))
    finally:
        import redis

        client = redis.Redis.from_url(url)
        names = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for begin in range(0, len(names), 256):
            client.delete(*names[begin : begin + 256])
        client.close()
        if own:
            shutil.rmtree(folder, ignore_errors=True)
    return RemoteResume(tokens, round(local_s, 3), round(remote_s, 3), round(remote_s / local_s, 3), round(lazy_s, 3),
                        round(lazy_s / local_s, 3), fetched, blocks, local_token == remote_token == lazy_token, used, url,
                        round(os.getloadavg()[0], 2))  # fmt: skip
