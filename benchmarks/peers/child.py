"""The kvpress side of the peers benchmark (``benchmarks/peers/run.py``): runs inside kvpress's own virtualenv.

kvpress 0.5.5 pins ``transformers<5.3``, older than the one hkv uses, so ``run.py``
creates a virtualenv for it and runs this script there as a subprocess. It imports only torch,
transformers and kvpress (never hkv). Input and output are JSON files:

    python benchmarks/peers/child.py JOB.json RESULT.json

``JOB.json``: ``model_dir``, ``gguf_file``, ``presses`` (names from :data:`PRESSES`),
``compression_ratio``, ``threads`` and ``prompts``: each with ``context`` (token ids of the first
forward, the one the presses compress), ``turns`` (``[{"input": [ids], "new_tokens": n}]``,
fed after the context on the compressed cache) and an ``id``.

How a press is applied: exactly as ``KVPressTextGenerationPipeline`` does, the press compresses
the KV of the first forward (the context prefill, ``model.model(context)``, run once) and the
later tokens (the questions and answers) are appended uncompressed, with position ids that
continue from the uncompressed length. The three presses share one prefill: a forward hook on
each attention layer calls every press's own ``compress`` on that layer's keys and values, as
``BasePress.forward_hook`` does for one press. Compression never changes the prefill itself
(each layer's output is computed with all keys before its cache is compressed), so this gives
the same caches as three separate prefills at a third of the cost.

``RESULT.json``: ``{"versions": {...}, "results": [{"id", "method", "generated": [[ids] per turn],
"step_s": [...], "kv_bytes", "peak_rss_bytes", "prefill_s"}]}``.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

PRESSES = ("SnapKV", "StreamingLLM", "ExpectedAttention")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) so the next read covers only what follows (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def make_press(name: str, ratio: float) -> Any:
    from kvpress import ExpectedAttentionPress, SnapKVPress, StreamingLLMPress

    kinds = {"SnapKV": SnapKVPress, "StreamingLLM": StreamingLLMPress, "ExpectedAttention": ExpectedAttentionPress}
    if name not in kinds:
        raise ValueError(f"press {name!r}: expected one of {sorted(kinds)}")
    return kinds[name](compression_ratio=ratio)


def cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values the cache holds."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.inference_mode()
def shared_prefill(model: Any, context: torch.Tensor, presses: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Prefill ``context`` ``[1, S]`` once; ``({press name: its compressed DynamicCache}, seconds)``."""
    from transformers import DynamicCache

    caches = {name: DynamicCache() for name in presses}
    for press in presses.values():
        press.post_init_from_model(model)

    def hook(module: Any, args: Any, kwargs: dict, output: Any) -> Any:
        layer = module.layer_idx
        full = kwargs["past_key_values"].layers[layer]
        for name, press in presses.items():
            keys, values = press.compress(module, kwargs["hidden_states"], full.keys, full.values, output[1], kwargs)
            caches[name].update(keys.contiguous(), values.contiguous(), layer)
        full.keys = full.values = torch.zeros(0)  # this layer's full KV is no longer needed
        return output

    handles = []
    for layer in model.model.layers:
        layer.self_attn.rotary_emb = model.model.rotary_emb  # as BasePress.__call__ does
        handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        start = time.perf_counter()
        model.model(input_ids=context, past_key_values=DynamicCache(), use_cache=True)
        seconds = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return caches, seconds


@torch.inference_mode()
def answer_turns(model: Any, cache: Any, context_len: int, turns: list[dict], *,
                 cache_kwarg: str = "past_key_values") -> tuple[list[list[int]], list[float]]:
    """Feed each turn's input then decode greedily; ``(generated ids per turn, seconds per decode step)``.

    Position ids continue from the uncompressed length, as kvpress's pipeline does. Also used by
    :mod:`.methods` (transformers 5.x there names the forward's cache ``cache``:
    ``cache_kwarg``)."""
    position = context_len  # true position of the next token (the cache may hold fewer)
    pending: list[int] = []  # the last generated token, not yet fed
    generated: list[list[int]] = []
    steps: list[float] = []
    for turn in turns:
        ids = torch.tensor([pending + list(turn["input"])])
        positions = torch.arange(position, position + ids.shape[1])[None]
        start = time.perf_counter()
        logits = model(input_ids=ids, **{cache_kwarg: cache}, position_ids=positions, use_cache=True, logits_to_keep=1).logits
        if ids.shape[1] == 1:
            steps.append(time.perf_counter() - start)
        position += ids.shape[1]
        out = [int(logits[0, -1].argmax())]
        for _ in range(int(turn["new_tokens"]) - 1):
            start = time.perf_counter()
            logits = model(input_ids=torch.tensor([[out[-1]]]), **{cache_kwarg: cache}, position_ids=torch.tensor([[position]]), use_cache=True).logits
            steps.append(time.perf_counter() - start)
            position += 1
            out.append(int(logits[0, -1].argmax()))
        generated.append(out)
        pending = [out[-1]]
    return generated, steps


def main(job_path: str, result_path: str) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    import kvpress

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], gguf_file=job["gguf_file"], dtype=torch.float32).eval()
    ratio = float(job["compression_ratio"])
    results = []
    for prompt in job["prompts"]:
        presses = {name: make_press(name, ratio) for name in job["presses"]}
        context = torch.tensor([prompt["context"]])
        caches, prefill_s = shared_prefill(model, context, presses)
        gc.collect()
        for name in list(caches):
            cache = caches.pop(name)
            reset_peak_rss()
            kv_after_prefill = cache_bytes(cache)
            generated, steps = answer_turns(model, cache, context.shape[1], prompt["turns"])
            results.append({
                "id": prompt["id"], "method": f"kvpress {name}", "generated": generated, "step_s": steps,
                "kv_bytes": max(kv_after_prefill, cache_bytes(cache)), "peak_rss_bytes": peak_rss_bytes(),
                "prefill_s": prefill_s / len(presses),
            })  # fmt: skip
            del cache
            gc.collect()
        # Written after every prompt (atomically), so a parent that stops waiting still has them.
        versions = {"transformers": transformers.__version__, "kvpress": getattr(kvpress, "__version__", "0.5.5"), "torch": torch.__version__}
        partial = Path(result_path).with_suffix(".tmp")
        partial.write_text(json.dumps({"versions": versions, "results": results}))
        partial.replace(result_path)
        print(f"kvpress: prompt {prompt['id']} done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python child.py JOB.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
