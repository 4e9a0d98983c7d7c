"""How well each prefetch prediction foresees the blocks a decode step selects (docs/benchmarks.md).

usage: python scripts/prediction_recall.py [--tokens 4096] [--new-tokens 24] [--positions original] [--budget 2048]

Answers `hkv bench passkey`'s prompt (SmolLM2-135M-Instruct, the real KV of a real text) twice
with hkv sparse (budget 2,048 tokens unless ``--budget``), greedy, prefetch on: once with next-layer prediction
(``prefetch.next_layer = true``: layers 1.. predicted from the layer below's input at the same
step) and once without (every layer predicted by its own query of the previous step). Output is
the same both times (prefetch never changes it). For each decode step and layer it compares the
last prediction handed to the prefetcher before the layer attends with the top-k far blocks the
layer then selects, and prints the mean recall (the share of selected blocks that were
predicted; a prediction holds top-k + margin blocks), overall and for layer 0 (always predicted
by the previous step) and layers 1.. . Residency does not enter: this is the predictor alone.

Public API only, except the prediction itself, read by wrapping the sequence's ``_prefetch``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

import hkv
from hkv.attention.selection import SelectionEvent
from hkv.default_model import load_default_model
from hkv.passkey import passkey_prompt


def run(model, ids: list[int], new_tokens: int, positions: str, budget: int, next_layer: bool) -> tuple[dict[int, list[float]], list[int]]:
    """Recall per layer over the decode steps, and the generated ids."""
    with tempfile.TemporaryDirectory(prefix="hkv-recall-") as store:
        config = hkv.Config.load(hkv.Config.load(), env={},
                                 tiers={"device": "1GiB", "host": "2GiB", "disk": "8GiB", "path": store, "dtype": "float16"},
                                 attention={"mode": "sparse", "positions": positions, "budget_tokens": budget},
                                 prefetch={"enabled": True, "next_layer": next_layer})  # fmt: skip
        predicted: dict[int, set[int]] = {}
        recall: dict[int, list[float]] = {}

        def observe(event: SelectionEvent) -> None:
            chosen = set(event.selection.scored.tolist())  # the top-k far blocks (sink and local are pinned)
            if event.queries == 1 and chosen and event.layer in predicted:
                recall.setdefault(event.layer, []).append(len(chosen & predicted[event.layer]) / len(chosen))

        with hkv.wrap(model, config) as rt, rt.new_cache(on_selection=observe) as cache:
            sequence = cache.sequence
            submit = sequence._prefetch

            def record(layer: int, prediction: list[int]) -> None:
                predicted[layer] = set(prediction[: sequence._share])
                submit(layer, prediction)

            sequence._prefetch = record
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, cache=cache)
        return recall, out[0, len(ids) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--positions", default="original", choices=["original", "remap"])
    parser.add_argument("--budget", type=int, default=2048, help="attention.budget_tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    ids, _ = passkey_prompt(tokenizer, args.tokens, args.depth, seed=0)
    results = {}
    for label, next_layer in (("next-layer", True), ("same-layer", False)):
        recall, generated = run(model, ids, args.new_tokens, args.positions, args.budget, next_layer)
        results[label] = (recall, generated)
        every = [r for values in recall.values() for r in values]
        if not every:
            raise SystemExit(f"nothing was scored: a budget of {args.budget} tokens reads every block of {args.tokens}")
        upper = [r for layer, values in recall.items() if layer > 0 for r in values]
        print(f"{label:>11}: recall {statistics.mean(every):.3f} over {len(every)} layer-steps; "
              f"layer 0 {statistics.mean(recall.get(0, [0.0])):.3f}, layers 1.. {statistics.mean(upper):.3f}")  # fmt: skip
    same = results["next-layer"][1] == results["same-layer"][1]
    print(f"generated tokens identical: {same}")


if __name__ == "__main__":
    main()
