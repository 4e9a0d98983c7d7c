"""Is the passkey's block selected at the answer step, layer by layer? (diagnosis, not a benchmark)

usage: python scripts/passkey_selection.py LENGTH DEPTH MODE [force]
  e.g. OMP_NUM_THREADS=1 python scripts/passkey_selection.py 32768 0.9 remap

Builds `hkv bench passkey`'s prompt (same seed), answers it with MODE (original / remap, budget
2048, the bench's config) and prints, for the last prompt chunk and the first decode steps, in
how many layers the block(s) holding the key were among the selected far blocks, and their rank
among the predicted candidates per layer (None: not predicted). `force` adds the key's blocks to
every selection: if the answer then becomes right, the selection was at fault, not the reading.
Used to find why remap missed 32K depth 0.9 (docs/positions.md).
"""
import sys, tempfile, time, json
from pathlib import Path
import torch
import hkv.sequence as seqmod
from hkv.prefetch.predictor import Selection
from hkv.default_model import load_default_model
from hkv.passkey import passkey_prompt, passkey_answer
from hkv.bench.passkey import answer_single

length, depth, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
force = len(sys.argv) > 4 and sys.argv[4] == "force"
model, tok = load_default_model(dtype=torch.float32)
seed = round(100 * depth) + length  # as hkv bench passkey, trial 0
ids, key = passkey_prompt(tok, length, depth, seed=seed)
# needle token positions: tokens of the key digits
text_ids = ids
keytoks = tok.encode(" " + key, add_special_tokens=False)
pos = [i for i in range(len(ids) - len(keytoks)) if ids[i:i + len(keytoks)] == keytoks]
needle_blocks = sorted({p // 64 for p in pos} | {(p + len(keytoks)) // 64 for p in pos})
print("key", key, "tokens", len(ids), "needle at", pos, "blocks", needle_blocks, flush=True)

orig_select = seqmod.select_blocks
orig_attend = seqmod.SequenceKV.attend
state = {"layer": None}
records = []

def attend(self, layer, query, scaling):
    state["layer"] = layer
    state["s"] = query.shape[1]
    state["total"] = self._tokens[layer]
    return orig_attend(self, layer, query, scaling)

def select(q, summary, **kw):
    sel = orig_select(q, summary, **kw)
    total, s = state["total"], state["s"]
    # record only the last prefill chunk and decode steps
    if total >= len(ids) - 8 or total > len(ids):
        chosen = set(sel.blocks.tolist())
        pred = sel.predicted.tolist()
        ranks = {b: (pred.index(b) if b in pred else None) for b in needle_blocks}
        hit = [b in chosen for b in needle_blocks]
        if force and not all(hit) and kw.get("topk") is not None:
            blocks = sorted(chosen | set(b for b in needle_blocks if b < kw["past_blocks"]))
            sel = Selection(torch.tensor(blocks), sel.predicted, sel.scored, sel.scores)
        records.append({"layer": state["layer"], "total": total, "s": s, "hit": hit, "ranks": ranks, "top": pred[:8]})
    return sel

seqmod.select_blocks = select
seqmod.SequenceKV.attend = attend
t = time.time()
with tempfile.TemporaryDirectory() as d:
    reply = answer_single(model, ids, mode, store=Path(d), budget=2048, new_tokens=7)
ans = passkey_answer(tok, reply)
print("answer", ans, "correct", ans == key, repr(tok.decode(reply)), f"{time.time()-t:.0f}s", flush=True)
steps = sorted({r["total"] for r in records})
for st in steps[:3]:
    rs = [r for r in records if r["total"] == st]
    print(f"step total={st}: layers hitting all needle blocks:", sum(all(r["hit"]) for r in rs), "/", len(rs))
    print("  ranks per layer:", [list(r["ranks"].values()) for r in rs])
    print("  top-8 predicted per layer:", [r["top"] for r in rs])
