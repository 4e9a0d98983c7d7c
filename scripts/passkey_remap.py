"""Passkey accuracy of SmolLM2-135M (trained to 8K tokens) beyond its trained length:
hkv sparse with attention.positions = "original" vs "remap", and full attention where affordable.

    python scripts/passkey_remap.py --lengths 4096 8192 16384 32768 --depths 0.1 0.5 0.9 \
        --modes original remap full --full-max 8192 --out results/passkey_remap.json

One model load; every (length, depth, trial) prompt is run through each mode in the same process.
Each hkv run gets its own temporary store folder (``tiers.path``, printed and recorded). Results
are written to the JSON after every run, so a long sweep can be read (or interrupted) midway.
Config of the hkv runs: device 256MiB, host 2GiB, disk 16GiB, tiers.dtype float16, sparse,
budget_tokens 2048 (sink 64, local 256, block 64), prefill chunk 1024; prefetch off unless
``--prefetch`` (it never changes results -- tests check bitwise equality -- and on a 2-core CPU
its threads only compete with the model).

``--merge A.json B.json ...`` combines the runs of several invocations into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from hkv import Config, wrap
from hkv.models import load_default_model, passkey_answer, passkey_prompt


def hkv_config(positions: str, store: str, budget: int, prefetch: bool = False) -> Config:
    return Config(
        tiers={"device": "256MiB", "host": "2GiB", "disk": "16GiB", "dtype": "float16", "path": store},
        attention={"mode": "sparse", "budget_tokens": budget, "block_tokens": 64, "sink_tokens": 64, "local_tokens": 256,
                   "prefill_chunk_tokens": 1024, "positions": positions},
        prefetch={"enabled": prefetch},
    )


def run_hkv(model, ids: torch.Tensor, positions: str, budget: int, new_tokens: int, prefetch: bool) -> tuple[torch.Tensor, dict]:
    with tempfile.TemporaryDirectory(prefix=f"hkv-passkey-{positions}-") as store:
        with wrap(model, hkv_config(positions, store, budget, prefetch)) as rt:
            out = rt.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            stats = rt.stats()
        info = {"store": store, "device_peak_bytes": stats.device_peak_bytes,
                "tiers": {name: t["blocks"] for name, t in stats.tiers.items()}}
    return out, info


def run_full(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import DynamicCache

    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, cache=DynamicCache(config=model.config))


def summarise(runs: list[dict]) -> dict:
    table: dict[str, dict[str, list[int]]] = {}
    for r in runs:
        cell = table.setdefault(r["mode"], {}).setdefault(str(r["length"]), [0, 0])
        cell[0] += int(r["correct"])
        cell[1] += 1
    return {mode: {n: {"correct": c, "trials": t, "accuracy": c / t} for n, (c, t) in by_len.items()} for mode, by_len in table.items()}


def merge(paths: list[Path], out: Path) -> None:
    parts = [json.loads(p.read_text()) for p in paths if p.exists()]
    runs = [run for part in parts for run in part["runs"]]
    meta = dict(parts[0]["meta"]) if parts else {}
    meta["command"] = [part["meta"]["command"] for part in parts]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summarise(runs), "runs": runs}, indent=2))
    print_table(runs)


def print_table(runs: list[dict]) -> None:
    """Accuracy per mode (rows) and length (columns): correct/trials."""
    lengths = sorted({r["length"] for r in runs})
    modes = [m for m in ("full", "original", "remap") if any(r["mode"] == m for r in runs)]
    print(f"{'mode':>9} " + " ".join(f"{n:>9}" for n in lengths))
    for mode in modes:
        cells = []
        for n in lengths:
            hits = [r["correct"] for r in runs if r["mode"] == mode and r["length"] == n]
            cells.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
        print(f"{mode:>9} " + " ".join(f"{c:>9}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=1, help="prompts (seeds) per length and depth")
    parser.add_argument("--modes", nargs="+", default=["original", "remap", "full"], choices=["original", "remap", "full"])
    parser.add_argument("--full-max", type=int, default=8192, help="longest prompt run with full attention (DynamicCache)")
    parser.add_argument("--budget", type=int, default=2048, help="attention.budget_tokens")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="model weights dtype (the KV is stored in float16 either way)")
    parser.add_argument("--new-tokens", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--prefetch", action="store_true", help="run the prefetcher (results are identical either way)")
    parser.add_argument("--out", type=Path, default=Path("results/passkey_remap.json"))
    parser.add_argument("--merge", type=Path, nargs="+", help="merge these result files into --out and exit")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_default_model(dtype=getattr(torch, args.dtype))
    meta = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "trained_length": model.config.max_position_embeddings,
        "rope": dict(model.config.rope_parameters), "weights_dtype": args.dtype, "kv_dtype": "float16",
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} torch threads".strip(),
        "torch": torch.__version__, "config": hkv_config("remap", "<temp dir per run>", args.budget, args.prefetch).as_dict(),
        "command": "python scripts/passkey_remap.py " + " ".join(
            [f"--lengths {' '.join(map(str, args.lengths))}", f"--depths {' '.join(map(str, args.depths))}",
             f"--trials {args.trials}", f"--modes {' '.join(args.modes)}", f"--full-max {args.full_max}",
             f"--budget {args.budget}", f"--dtype {args.dtype}"]),
    }
    runs: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'length':>7} {'depth':>5} {'trial':>5} {'mode':>8} {'ok':>3} {'answer':>8} {'key':>6} {'seconds':>8}")
    for length in args.lengths:
        for depth in args.depths:
            for trial in range(args.trials):
                seed = 1000 * trial + round(100 * depth) + length
                ids, key = passkey_prompt(tokenizer, length, depth, seed=seed)
                ids = torch.tensor([ids])
                for mode in args.modes:
                    if mode == "full" and length > args.full_max:
                        continue
                    start = time.perf_counter()
                    info: dict = {}
                    if mode == "full":
                        out = run_full(model, ids, args.new_tokens)
                    else:
                        out, info = run_hkv(model, ids, mode, args.budget, args.new_tokens, args.prefetch)
                    seconds = time.perf_counter() - start
                    answer = passkey_answer(tokenizer, out[0, ids.shape[1] :])
                    run = {"length": length, "tokens": ids.shape[1], "depth": depth, "trial": trial, "seed": seed, "mode": mode,
                           "key": key, "answer": answer, "correct": answer == key, "seconds": round(seconds, 1),
                           "text": tokenizer.decode(out[0, ids.shape[1] :]), **info}
                    runs.append(run)
                    print(f"{length:>7} {depth:>5} {trial:>5} {mode:>8} {'yes' if run['correct'] else 'no':>3} "
                          f"{answer:>8} {key:>6} {seconds:>8.1f}", flush=True)
                    args.out.write_text(json.dumps({"meta": meta, "summary": summarise(runs), "runs": runs}, indent=2))
    print_table(runs)


if __name__ == "__main__":
    main()
