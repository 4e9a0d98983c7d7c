"""``hkv bench ruler``: RULER-style tasks (:mod:`hkv.ruler`: several keys with distractors,
several values for one key, a variable traced through assignments, the most frequent words) at
a prompt length, answered by full attention (the reference, within the model's trained length)
and every hkv mode asked for (``exact``, ``original``, ``remap``, and a sparse mode with a lossy
disk encoding such as ``remap+int4``), same prompts, same run.

Each prompt is answered as in ``hkv bench passkey``'s ``late`` variant (the document stored in a
session, the runtime closed and reopened, then the question), so an encoding's blocks are read
back from disk, or in one call (``single``). A task's score is the fraction of its answers found
in the greedy reply; the table gives the mean over trials per task and mode.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..ruler import TASKS, score, sized_task
from .passkey import answer_single, answer_turns, check_mode

ANSWER_TOKENS = 40  # several numbers or names


def run_ruler_bench(
    *, length: int, tasks: tuple[str, ...] = TASKS, trials: int = 2, modes: tuple[str, ...] = ("full", "remap", "remap+int4"),
    variant: str = "late", budget: int = 2048, model: torch.nn.Module | None = None, tokenizer: Any = None,
    base_config: Any = None, store_dir: Path | None = None, log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Answer every (task, trial) prompt with every mode; ``{"meta", "summary", "runs"}``."""
    from ..default_model import load_default_model

    for mode in modes:
        check_mode(mode)
    bad = [t for t in tasks if t not in TASKS]
    if bad or variant not in ("single", "late"):
        raise ValueError(f"unknown task {bad} or variant {variant!r}: tasks are {TASKS}, variants single, late")
    if model is None:
        model, tokenizer = load_default_model(dtype=torch.float32)
    runs: list[dict[str, Any]] = []
    log(f"{'task':>10} {'trial':>5} {'mode':>11} {'score':>5} {'seconds':>8}  reply")
    for task_name in tasks:
        for trial in range(trials):
            task, document, question = sized_task(tokenizer, task_name, length, seed=trial)
            for mode in modes:
                start = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="hkv-ruler-", dir=store_dir) as store:
                    if variant == "late":
                        reply_ids = answer_turns(model, tokenizer, document, question, mode, store=Path(store), budget=budget,
                                                 new_tokens=ANSWER_TOKENS, base=base_config)  # fmt: skip
                    else:
                        reply_ids = answer_single(model, document + question, mode, store=Path(store), budget=budget,
                                                  new_tokens=ANSWER_TOKENS, base=base_config)  # fmt: skip
                reply = tokenizer.decode(reply_ids, skip_special_tokens=True)
                run = {"task": task_name, "trial": trial, "mode": mode, "tokens": len(document) + len(question),
                       "score": score(task, reply), "answers": list(task.answers), "reply": reply,
                       "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
                runs.append(run)
                log(f"{task_name:>10} {trial:>5} {mode:>11} {run['score']:>5.2f} {run['seconds']:>8.1f}  {reply[:60]!r}")
    summary = [
        {"task": t, "mode": m, "score": round(statistics.mean(r["score"] for r in runs if r["task"] == t and r["mode"] == m), 3),
         "trials": trials}
        for t in tasks for m in modes
    ]  # fmt: skip
    meta = {"length": length, "variant": variant, "budget_tokens": budget, "torch": torch.__version__,
            "model": getattr(model.config, "name_or_path", "") or type(model).__name__}  # fmt: skip
    return {"meta": meta, "summary": summary, "runs": runs}


def table_lines(figures: dict[str, Any]) -> list[str]:
    """One row per mode, one column per task: mean score."""
    tasks = list(dict.fromkeys(row["task"] for row in figures["summary"]))
    modes = list(dict.fromkeys(row["mode"] for row in figures["summary"]))
    cell = {(row["task"], row["mode"]): row["score"] for row in figures["summary"]}
    lines = [f"{'mode':>11} " + " ".join(f"{t:>10}" for t in tasks)]
    lines += [f"{m:>11} " + " ".join(f"{cell[(t, m)]:>10.2f}" for t in tasks) for m in modes]
    return lines
