"""hkv beside the caches a user would otherwise pick, at equal device memory, on the same prompts.

    python benchmarks/peers/run.py --json results/peers.json [--tokens 4096] [--trials 3] ...

(``--help`` lists the options; ``hkv bench plot results/peers.json peers.png`` redraws the
picture.) Not part of the hkv package: hkv runs through its public API only (:mod:`.methods`).

Every method answers the same passkey prompts (token ids built once, here) with the same model
(SmolLM2-135M-Instruct, fp32, CPU by default) and greedy decoding. The memory given to the
methods that bound it is 25% of the full KV of the context (``DEVICE_FRACTION``):

- ``hkv sparse`` / ``hkv exact``: device tier = 25% of the context's KV, host tier 50%, the rest
  on disk; sparse mode reads ``budget_tokens`` = 25% of the context per step (sink and local
  window included), exact mode streams every block through the device tier.
- ``DynamicCache``: full attention, 100% of the KV (the reference, not memory-bounded).
- ``QuantizedCache fp8``: transformers' built-in fp8 backend (1 byte per value: 25% of fp32).
- ``SlidingWindow``: transformers' ``DynamicSlidingWindowLayer`` with a window of 25% of the context.
- ``kvpress SnapKV`` / ``StreamingLLM`` / ``ExpectedAttention`` at ``compression_ratio`` 0.75
  (keep 25%), in their own virtualenv (kvpress 0.5.5 pins ``transformers<5.3``): see
  :mod:`.child` (``benchmarks/peers/child.py``), which documents exactly how each press is applied.

Tasks: ``single`` -- the passkey prompt at depths 0.1/0.5/0.9; all but its last token is the
context (compressed by the eviction methods, question included), then the last token and the
answer are decoded. ``late`` -- the multi-turn late question: the context is the same document
followed by an earlier exchange (``DECOY``: a question about the text and its answer, given as
text so every method sees the same turn, not a reply of its own); the eviction methods compress
it then, not knowing the real question; only then does the passkey question arrive, and it is
answered on whatever the cache kept. (A first version let each method generate the decoy's
answer: the replies differed per method and the 135M model then failed the question even with
full attention, so the task measured the decoy, not the cache.)

The prefill of the transformers caches is shared: one full-attention prefill, from which the fp8
and sliding-window caches are built exactly as their own ``update`` would (one forward of the
context into them stores the same tensors). kvpress's presses share one prefill likewise.
Figures per (method, task): accuracy over the trials, decode ms per token (median of every
single-token forward after the context), peak process RSS while answering (VmHWM reset after
the context prefill), KV bytes on the device (the bounded tier; all of the cache for the others)
and in all tiers.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

if __package__ in (None, ""):  # run as a script (python benchmarks/peers/run.py): import its siblings as `peers`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import typer

from hkv.cli.bench import write_png
from hkv.cli.common import choices, write_json
from hkv.passkey import PASSKEY_QUESTION
from peers.methods import DEVICE_FRACTION, LOCAL_METHODS, full_kv_bytes, record, run_hkv, run_transformers

COMPRESSION_RATIO = 1 - DEVICE_FRACTION  # kvpress: fraction of the KV pruned
DEPTHS = (0.1, 0.5, 0.9)
ANSWER_TOKENS = 6  # " " + 5 digits
DECOY = "\nWhat colour is the grass in the text above? The grass is green.\n"
TASKS = ("late", "single")
PRESSES = ("SnapKV", "StreamingLLM", "ExpectedAttention")
KVPRESS_REQUIREMENTS = ("kvpress==0.5.5", "transformers<5.3")
NOT_RUN = {
    "QuantizedCache quanto/hqq": "not installed here; the fp8 backend built into transformers needs no extra "
    "package and stores exactly 25% of the fp32 KV, the budget every bounded method gets",
}


# -- prompts -----------------------------------------------------------------------------------


def build_prompts(tokenizer: Any, tokens: int, trials: int, tasks: tuple[str, ...] = TASKS) -> list[dict[str, Any]]:
    """The prompts every method answers: ``{"id", "task", "trial", "depth", "key", "context", "turns"}``.

    ``context``: token ids of the first forward; ``turns``: ``[{"input": ids, "new_tokens": n}]``
    fed after it (the last turn's output is the answer).
    """
    from hkv.passkey import passkey_prompt, split_passkey_question

    decoy = tokenizer.encode(DECOY, add_special_tokens=False)
    prompts = []
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"tasks {sorted(unknown)}: expected some of {TASKS}")
    for trial in range(trials):  # trial-major, so that a run stopped early has every task
        for task in tasks:
            depth = DEPTHS[trial % len(DEPTHS)]
            ids, key = passkey_prompt(tokenizer, tokens, depth, seed=trial)
            if task == "single":
                context, turns = ids[:-1], [{"input": ids[-1:], "new_tokens": ANSWER_TOKENS}]
            else:
                document, question = split_passkey_question(tokenizer, ids)
                context = document + decoy
                turns = [{"input": question, "new_tokens": ANSWER_TOKENS}]
            prompts.append({"id": f"{task}-{trial}", "task": task, "trial": trial, "depth": depth, "key": key,
                            "context": context, "turns": turns})  # fmt: skip
    return prompts


# -- kvpress in its own virtualenv -------------------------------------------------------------


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def ensure_peers_venv(venv: Path, log: Callable[[str], None]) -> Path:
    """The peers' virtualenv's python, creating the venv and installing kvpress on first use.

    ``python -m venv --system-site-packages`` (to reuse this environment's CPU torch and gguf),
    then ``pip install kvpress==0.5.5 'transformers<5.3' torch==<this torch>`` (the torch pin
    keeps pip from pulling another build)."""
    python = _venv_python(venv)
    probe = "import kvpress, transformers; print(transformers.__version__)"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    log(f"peers: creating the virtualenv {venv} for kvpress (first use; pip install {' '.join(KVPRESS_REQUIREMENTS)}; a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    share_torch(python)
    pins = [*KVPRESS_REQUIREMENTS, f"torch=={torch.__version__}"]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
    return python


def _venv_torch(python: Path) -> str | None:
    done = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def share_torch(python: Path) -> None:
    """Make this environment's torch the venv's, so that pip never installs another build.

    ``--system-site-packages`` shows the BASE interpreter's packages: where this environment is
    itself a virtualenv, its torch is not among them and ``pip install torch==X`` would fetch
    PyPI's (CUDA) build. A ``.pth`` file in the venv then adds the folder holding this torch
    (after the venv's own packages, so kvpress's transformers still wins). RuntimeError if the
    venv still sees no torch of this version."""
    if _venv_torch(python) == torch.__version__:
        return
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "hkv-parent-torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    seen = _venv_torch(python)
    if seen != torch.__version__:
        raise RuntimeError(f"the peers virtualenv {python} sees torch {seen}, not this environment's {torch.__version__}; "
                           "refusing to let pip install another torch build (delete the venv and retry)")  # fmt: skip


def start_kvpress(python: Path, prompts: list[dict], workdir: Path, threads: int) -> tuple[subprocess.Popen, Path]:
    """Start :mod:`.child` (``child.py``, run as a script) in the venv on ``prompts``; ``(process, result path)``."""
    from hkv.default_model import DEFAULT_GGUF, default_model_dir

    job = {"model_dir": str(default_model_dir()), "gguf_file": DEFAULT_GGUF, "presses": list(PRESSES),
           "compression_ratio": COMPRESSION_RATIO, "threads": threads,
           "prompts": [{"id": p["id"], "context": p["context"], "turns": p["turns"]} for p in prompts]}  # fmt: skip
    (workdir / "job.json").write_text(json.dumps(job))
    result = workdir / "result.json"
    child = Path(__file__).resolve().with_name("child.py")
    process = subprocess.Popen([str(python), str(child), str(workdir / "job.json"), str(result)], cwd=workdir)
    return process, result


# -- the benchmark -----------------------------------------------------------------------------


def summarise(records: list[dict], prompts: list[dict], tokenizer: Any) -> list[dict]:
    """One row per (method, task): accuracy, decode ms per token, peak RSS, KV bytes."""
    from hkv.passkey import passkey_answer

    by_id = {p["id"]: p for p in prompts}
    for answered in records:
        prompt = by_id[answered["id"]]
        answered["answer"] = passkey_answer(tokenizer, answered["generated"][-1])
        answered["correct"] = answered["answer"] == prompt["key"]
        answered["key"], answered["depth"] = prompt["key"], prompt["depth"]
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in records))
    for method in methods:
        for task in TASKS:
            mine = [r for r in records if r["method"] == method and r["task"] == task]
            if not mine:
                continue
            steps = [s for r in mine for s in r["step_s"]]
            rows.append({
                "method": method, "task": task, "trials": len(mine),
                "correct": sum(r["correct"] for r in mine), "accuracy": sum(r["correct"] for r in mine) / len(mine),
                "decode_ms": 1000 * statistics.median(steps) if steps else None,
                "peak_rss_mib": max(r["peak_rss_bytes"] for r in mine) / 2**20,
                "kv_device_bytes": max(r["kv_device_bytes"] for r in mine),
                "kv_total_bytes": max(r["kv_total_bytes"] for r in mine),
            })  # fmt: skip
    return rows


def run_peers_bench(
    *,
    tokens: int = 4096,
    trials: int = 3,
    venv: Path | str = ".venv-peers",
    peers: bool = True,
    parallel: bool = False,
    methods: tuple[str, ...] = LOCAL_METHODS,
    tasks: tuple[str, ...] = TASKS,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    max_minutes: float | None = None,
    on_prompt: Callable[[list[dict], list[dict]], None] | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Accuracy, decode latency and memory of hkv and its peers on the same passkey prompts.

    ``tokens``: prompt length; ``trials``: prompts per task (depths cycle through 0.1/0.5/0.9,
    the key changes with the trial). ``peers``: also run kvpress in the virtualenv ``venv``
    (created on first use); ``parallel``: run it while the local methods run (quicker; timings
    then share the CPU). ``methods``: the local methods to run (of :data:`LOCAL_METHODS`).
    ``model``/``tokenizer``: default SmolLM2-135M-Instruct (kvpress needs that default model).
    ``max_minutes``: start no new prompt after that long (and stop waiting for kvpress 10
    minutes later, keeping the prompts it finished); ``on_prompt(rows, records)``: called after
    each prompt with the figures so far. Prompts go trial by trial, each task in turn.
    Returns ``{"rows": [...], "records": [...], "not_run": {...}, ...}``.
    """
    if trials < 1 or tokens < 64:
        raise ValueError(f"trials = {trials}, tokens = {tokens}: need trials >= 1 and tokens >= 64")
    unknown = set(methods) - set(LOCAL_METHODS)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)}: expected some of {LOCAL_METHODS}")
    started = time.perf_counter()
    if model is None:
        from hkv.default_model import load_default_model

        log("peers: loading SmolLM2-135M-Instruct")
        model, tokenizer = load_default_model()
    elif tokenizer is None:
        raise ValueError("a tokenizer must come with the model")
    prompts = build_prompts(tokenizer, tokens, trials, tasks)
    not_run = dict(NOT_RUN)
    workdir = Path(tempfile.mkdtemp(prefix="hkv-peers-job-"))
    child = None
    records: list[dict] = []
    versions: dict[str, Any] = {}
    try:
        if peers:
            python = ensure_peers_venv(Path(venv).absolute(), log)
            log(f"peers: kvpress runs in {venv} ({'in parallel with' if parallel else 'after'} the local methods)")
            if parallel:
                child, _ = start_kvpress(python, prompts, workdir, torch.get_num_threads())
        else:
            for press in PRESSES:
                not_run[f"kvpress {press}"] = "skipped (--no-peers)"
        local = tuple(m for m in methods if not m.startswith("hkv"))
        failed: set[str] = set()
        for number, prompt in enumerate(prompts):
            if max_minutes is not None and time.perf_counter() - started > 60 * max_minutes:
                log(f"peers: --max-minutes {max_minutes} reached after {number} of {len(prompts)} prompts")
                break
            groups = [(f"hkv {mode}", (f"hkv {mode}",), lambda mode=mode: run_hkv(model, [prompt], mode)) for mode in ("sparse", "exact")]
            groups.append((", ".join(local), local, lambda: run_transformers(model, [prompt], local)))
            for label, names, run in groups:
                if not set(names) & set(methods) or label in failed:
                    continue
                log(f"peers: prompt {prompt['id']}: {label}")
                try:
                    records += run()
                except Exception as error:  # one method failing must not lose the others' figures
                    log(f"peers: {label} failed:\n{traceback.format_exc()}")
                    failed.add(label)
                    not_run.update({name: f"failed: {type(error).__name__}: {error}" for name in names})
            if on_prompt is not None:
                on_prompt(summarise(records, prompts, tokenizer), records)
        if peers:
            if child is None:
                child, _ = start_kvpress(python, prompts, workdir, torch.get_num_threads())
            try:
                child.wait(timeout=None if max_minutes is None else max(60.0, 60 * max_minutes + 600 - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                log("peers: stopped waiting for kvpress; its prompts done so far are kept")
                child.kill()
                child.wait()
            if child.returncode != 0 and not (workdir / "result.json").exists():
                not_run.update({f"kvpress {p}": f"the kvpress run failed (exit {child.returncode}; its output is above)" for p in PRESSES})
        if peers and (workdir / "result.json").exists():
            out = json.loads((workdir / "result.json").read_text())
            versions = out["versions"]
            for result in out["results"]:
                task = next(p["task"] for p in prompts if p["id"] == result["id"])
                records.append(record({"id": result["id"], "task": task}, result["method"], result["generated"], result["step_s"],
                                      result["kv_bytes"], result["kv_bytes"], result["peak_rss_bytes"], result["prefill_s"]))  # fmt: skip
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    context_tokens = max(len(p["context"]) for p in prompts)
    import transformers

    return {
        "rows": summarise(records, prompts, tokenizer),
        "records": records,
        "not_run": not_run,
        "tokens": tokens,
        "context_tokens": context_tokens,
        "full_kv_bytes": full_kv_bytes(model, context_tokens),
        "device_fraction": DEVICE_FRACTION,
        "trials": trials,
        "depths": list(DEPTHS),
        "decoy": DECOY,
        "question": PASSKEY_QUESTION,
        "model": f"{type(model).__name__} ({model.config.num_hidden_layers} layers), {next(model.parameters()).dtype}",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "parallel": parallel,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "kvpress_env": versions},
        "wall_s": time.perf_counter() - started,
    }


def print_table(figures: dict[str, Any]) -> None:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    mib = 2**20
    print(f"peers at {figures['device_fraction']:.0%} of the context's KV ({figures['full_kv_bytes'] / mib:.1f} MiB full), "
          f"{figures['context_tokens']} context tokens, {figures['model']} on {figures['device']} ({figures['threads']} threads)")  # fmt: skip
    print(f"{'method':<24} {'task':<7} {'accuracy':>9} {'trials':>6} {'ms/token':>9} {'peak RSS MiB':>13} {'KV device MiB':>14} {'KV all MiB':>11}")
    for row in figures["rows"]:
        print(
            f"{row['method']:<24} {row['task']:<7} {row['accuracy']:>9.0%} {row['trials']:>6} {fmt(row['decode_ms'], '9.1f')} "
            f"{row['peak_rss_mib']:>13.0f} {row['kv_device_bytes'] / mib:>14.1f} {row['kv_total_bytes'] / mib:>11.1f}"
        )
    for method, why in figures["not_run"].items():
        print(f"not run: {method}: {why}")


# -- the command -------------------------------------------------------------------------------


app = typer.Typer(add_completion=False)


@app.command()
def main(
    json_path: Annotated[Optional[Path], typer.Option("--json", help="write the figures to this JSON file")] = None,
    tokens: Annotated[int, typer.Option(help="passkey prompt length in tokens")] = 4096,
    trials: Annotated[int, typer.Option(help="prompts per task and method (depths cycle 0.1/0.5/0.9)")] = 3,
    venv: Annotated[Path, typer.Option(help="kvpress's own virtualenv, created on first use")] = Path(".venv-peers"),
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="also run kvpress (in --venv)")] = True,
    parallel: Annotated[bool, typer.Option(help="run kvpress while the local methods run (faster; shared CPU)")] = False,
    png: Annotated[Optional[Path], typer.Option(help="accuracy bar chart (needs matplotlib; default: beside --json)")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="start no new prompt after this long (partial figures kept)")] = None,
    tasks: Annotated[str, typer.Option(help="comma-separated: late (question in a later turn), single")] = "late,single",
    methods: Annotated[Optional[str], typer.Option(help="comma-separated local methods (default: all of hkv sparse, hkv exact, DynamicCache, QuantizedCache fp8, SlidingWindow)")] = None,
) -> None:
    """hkv vs DynamicCache, its fp8/sliding caches and kvpress presses at 25% of the KV, same prompts."""
    chosen_tasks = choices(tasks, "--tasks", TASKS)
    chosen_methods = choices(methods, "--methods", LOCAL_METHODS) if methods is not None else LOCAL_METHODS

    def save_partial(rows: list, records: list) -> None:  # --json holds the figures so far while it runs
        write_json(json_path, {"partial": True, "rows": rows, "records": records}, quiet=True)

    figures = run_peers_bench(tokens=tokens, trials=trials, venv=venv, peers=peers, parallel=parallel, tasks=chosen_tasks,
                              methods=chosen_methods, max_minutes=max_minutes, on_prompt=save_partial)  # fmt: skip
    print_table(figures)
    write_json(json_path, figures)
    write_png(png if png is not None else (json_path.with_suffix(".png") if json_path is not None else None), figures)


if __name__ == "__main__":
    app()
