"""``hkv bench passkey``: can the model find a 5-digit key hidden in a long filler text?

SmolLM2-135M-Instruct was trained to 8K tokens. Each prompt (:func:`hkv.passkey.passkey_prompt`)
hides the key at a relative ``depth`` of the filler and ends in the question and the cue
"The pass key is"; the answer is the first digits generated greedily. Methods (``MODES``):

- ``exact``: hkv exact attention (every block, model positions): the model's own answer;
- ``original``: hkv sparse (``budget_tokens`` per step), blocks at their original positions;
- ``remap``: hkv sparse with ``attention.positions = "remap"``: the selected far blocks are
  re-rotated to just before the local window (docs/positions.md), so no relative distance the
  model sees exceeds what it was trained on;
- ``full``: transformers' ``DynamicCache``, full attention (where ``length <= full_max``).

A sparse mode may name a lossy disk encoding (``remap+int4``, ``original+int8``:
``tiers.disk_encoding``, docs/store.md): blocks read back from the store are then decoded from
int8 / int4. Only blocks that come back from disk are affected, so the ``late`` variant (the
session reopened from the store) is the one that measures an encoding.

Variants (``VARIANTS``): ``single`` -- the whole prompt in one call; ``late`` -- the question
arrives in a later turn, after the context was cached: the document is appended to an hkv
session and committed, the runtime is closed, a NEW runtime reopens the session from the store
and only then gets the question (for ``full``: the document's DynamicCache, then the question).

Each hkv run has its own temporary store; ``exact`` stores blocks in the model's dtype (exact),
the sparse modes in float16 (as ``examples/million.toml``). Runs go length by length, depth by
depth, so a long sweep stopped midway has every mode of what it did.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

MODES = ("exact", "original", "remap", "full")
VARIANTS = ("single", "late")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
ANSWER_TOKENS = 7  # a space, the 5 digits, one more


@dataclass(slots=True)
class PasskeyRun:
    """One prompt answered by one method. ``seconds``: wall time of the whole run (prefill,
    answer; for ``late`` also the commit, close and reopen)."""

    length: int  # the length asked for (tokens)
    tokens: int  # the prompt's actual length
    depth: float
    trial: int
    seed: int
    mode: str
    variant: str
    key: str
    answer: str
    correct: bool
    seconds: float
    reply: str


def split_mode(mode: str) -> tuple[str, str]:
    """``"remap+int4"`` -> ``("remap", "int4")``; ``"remap"`` -> ``("remap", "none")``."""
    base, _, encoding = mode.partition("+")
    return base, encoding or "none"


def check_mode(mode: str) -> None:
    base, encoding = split_mode(mode)
    if base not in MODES or encoding not in ("none", "int8", "int4") or (encoding != "none" and base not in ("original", "remap")):
        raise ValueError(f"unknown mode {mode!r}: modes are {MODES}, a sparse one optionally +int8 or +int4 (remap+int4)")


def passkey_config(mode: str, store: str | Path, budget: int, base: Any = None) -> Any:
    """The hkv config of ``mode`` (exact / original / remap, maybe +int8 / +int4) with its store at ``store``;
    ``base``: a Config whose tiers budgets and prefetch settings are kept (None: 256 MiB device,
    2 GiB host, 16 GiB disk, prefetch off -- on 2 cores its threads only compete with the model,
    and it never changes results)."""
    from ..config import Config

    mode, encoding = split_mode(mode)
    tiers = {"device": "256MiB", "host": "2GiB", "disk": "16GiB"} if base is None else {
        "device": base.tiers.device, "host": base.tiers.host, "disk": base.tiers.disk}  # fmt: skip
    tiers.update(path=str(store), dtype="auto" if mode == "exact" else "float16", disk_encoding=encoding)
    attention = {"mode": "exact", "positions": "original"} if mode == "exact" else {
        "mode": "sparse", "positions": mode, "budget_tokens": budget}  # fmt: skip
    prefetch = {"enabled": False} if base is None else base.prefetch.model_dump()
    return Config.load(Config.load(), env={}, tiers=tiers, attention=attention, prefetch=prefetch)


def _greedy(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **kwargs: Any) -> list[int]:
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def answer_single(model: torch.nn.Module, ids: list[int], mode: str, *, store: Path, budget: int, new_tokens: int,
                  base: Any = None) -> list[int]:
    """The reply to the whole prompt ``ids`` in one call."""
    prompt = torch.tensor([ids], device=model.device)
    if split_mode(mode)[0] == "full":
        from transformers import DynamicCache

        with torch.inference_mode():
            return _greedy(model, prompt, new_tokens, cache=DynamicCache(config=model.config))
    from ..integrations.runtime import wrap

    with wrap(model, passkey_config(mode, store, budget, base)) as rt:
        out = rt.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, prompt.shape[1] :].tolist()


def answer_late(model: torch.nn.Module, tokenizer: Any, ids: list[int], mode: str, *, store: Path, budget: int,
                new_tokens: int, base: Any = None) -> list[int]:
    """The reply when the question comes in a later turn than the document (see the module doc)."""
    from ..passkey import split_passkey_question

    document, question = split_passkey_question(tokenizer, ids)
    return answer_turns(model, tokenizer, document, question, mode, store=store, budget=budget, new_tokens=new_tokens, base=base)


def answer_turns(model: torch.nn.Module, tokenizer: Any, document: list[int], question: list[int], mode: str, *, store: Path,
                 budget: int, new_tokens: int, base: Any = None) -> list[int]:  # fmt: skip
    """The reply to ``question`` asked in a later turn than ``document`` (see the module doc)."""
    if split_mode(mode)[0] == "full":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([document], device=model.device), cache=cache, use_cache=True)
            return _greedy(model, torch.tensor([document + question], device=model.device), new_tokens, cache=cache)
    from ..integrations.runtime import wrap

    config = passkey_config(mode, store, budget, base)
    with wrap(model, config) as rt, rt.session("passkey", tokenizer=tokenizer) as session:
        session.append(torch.tensor([document]), progress=False)  # committed on close
    with wrap(model, config) as rt, rt.session("passkey", tokenizer=tokenizer) as session:
        if session.restored.new:
            raise RuntimeError("the passkey session was not found in the store after it was committed")
        before = session.tokens.numel() + len(question)
        out = session.generate(torch.tensor([question]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, progress=False)  # fmt: skip
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return sequences[0, before:].tolist()


def summarise(runs: list[PasskeyRun]) -> list[dict[str, Any]]:
    """Accuracy per (variant, mode, length): ``{"variant", "mode", "length", "correct", "trials", "accuracy"}``."""
    cells: dict[tuple[str, str, int], list[int]] = {}
    for run in runs:
        cell = cells.setdefault((run.variant, run.mode, run.length), [0, 0])
        cell[0] += int(run.correct)
        cell[1] += 1
    order = {m: i for i, m in enumerate(MODES)}
    rows = [{"variant": v, "mode": m, "length": n, "correct": c, "trials": t, "accuracy": c / t}
            for (v, m, n), (c, t) in cells.items()]  # fmt: skip
    return sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), order[split_mode(r["mode"])[0]], r["mode"], r["length"]))


def run_passkey_bench(
    *,
    lengths: tuple[int, ...],
    depths: tuple[float, ...] = DEPTHS,
    trials: int = 1,
    modes: tuple[str, ...] = ("original", "remap", "full"),
    variants: tuple[str, ...] = ("single",),
    full_max: int = 8192,
    exact_max: int = 8192,
    budget: int = 2048,
    new_tokens: int = ANSWER_TOKENS,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    base_config: Any = None,
    store_dir: Path | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Answer every (length, depth, trial) prompt with every mode and variant; the figures.

    ``model``/``tokenizer``: default SmolLM2 (fp32). ``full_max`` / ``exact_max``: longest prompt
    run with full attention / hkv exact (both cost quadratic time on a CPU). ``on_run``: called
    with the figures so far after each run (to save a long sweep as it goes). Returns
    ``{"meta", "summary", "runs", "skipped"}``.
    """
    from ..default_model import load_default_model
    from ..passkey import passkey_answer, passkey_prompt

    for mode in modes:
        check_mode(mode)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant {bad}: variants are {VARIANTS}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths {depths}: each must be between 0 and 1")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: torch sees no CUDA GPU")
    if model is None:
        model, tokenizer = load_default_model(dtype=torch.float32)
    model = model.to(device)
    limits = {"full": full_max, "exact": exact_max}  # by mode (a sparse mode has none)
    meta = {
        "model": getattr(model.config, "name_or_path", "") or type(model).__name__,
        "trained_length": getattr(model.config, "max_position_embeddings", None),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} torch threads",
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "torch": torch.__version__, "budget_tokens": budget, "full_max": full_max, "exact_max": exact_max,
        "config": {m: passkey_config(m, "<temp dir per run>", budget, base_config).as_dict() for m in modes if m != "full"},
    }  # fmt: skip
    runs: list[PasskeyRun] = []
    skipped = sorted({f"{m} beyond {limits[m]} tokens" for m in modes if m in limits and max(lengths) > limits[m]})

    def figures() -> dict[str, Any]:
        return {"meta": meta, "summary": summarise(runs), "runs": [asdict(r) for r in runs], "skipped": skipped}

    log(f"{'length':>7} {'depth':>5} {'trial':>5} {'variant':>7} {'mode':>11} {'ok':>3} {'answer':>8} {'key':>6} {'seconds':>8}")
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                seed = 1000 * trial + round(100 * depth) + length
                ids, key = passkey_prompt(tokenizer, length, depth, seed=seed)
                for variant in variants:
                    for mode in modes:
                        if length > limits.get(mode, length):
                            continue
                        start = time.perf_counter()
                        with tempfile.TemporaryDirectory(prefix=f"hkv-passkey-{mode}-", dir=store_dir) as store:
                            if variant == "single":
                                reply = answer_single(model, ids, mode, store=Path(store), budget=budget,
                                                      new_tokens=new_tokens, base=base_config)  # fmt: skip
                            else:
                                reply = answer_late(model, tokenizer, ids, mode, store=Path(store), budget=budget,
                                                    new_tokens=new_tokens, base=base_config)  # fmt: skip
                        answer = passkey_answer(tokenizer, reply)
                        run = PasskeyRun(length=length, tokens=len(ids), depth=depth, trial=trial, seed=seed, mode=mode,
                                         variant=variant, key=key, answer=answer, correct=answer == key,
                                         seconds=round(time.perf_counter() - start, 2), reply=tokenizer.decode(reply))  # fmt: skip
                        runs.append(run)
                        log(f"{length:>7} {depth:>5} {trial:>5} {variant:>7} {mode:>11} {'yes' if run.correct else 'no':>3} "
                            f"{answer or '-':>8} {key:>6} {run.seconds:>8.1f}")  # fmt: skip
                        if on_run is not None:
                            on_run(figures())
    return figures()


def table_lines(figures: dict[str, Any]) -> list[str]:
    """Accuracy table: one row per (variant, mode), one column per length, ``correct/trials``."""
    rows = figures["summary"]
    lengths = sorted({r["length"] for r in rows})
    keys = list(dict.fromkeys((r["variant"], r["mode"]) for r in rows))
    cell = {(r["variant"], r["mode"], r["length"]): f"{r['correct']}/{r['trials']}" for r in rows}
    lines = [f"{'variant':>7} {'mode':>11} " + " ".join(f"{n:>8}" for n in lengths)]
    for variant, mode in keys:
        lines.append(f"{variant:>7} {mode:>11} " + " ".join(f"{cell.get((variant, mode, n), '-'):>8}" for n in lengths))
    return lines
