"""hkv.wrap on the default model: a passkey prompt larger than the device tier (about a minute on a 2-core CPU).

    python examples/wrap_passkey.py          # a 2,048-token prompt
    python examples/wrap_passkey.py 1024     # a shorter prompt (tokens)

The store is ./hkv-store-wrap, a folder of this example's own: a store keeps blocks of one
layout, and this one keeps float16 blocks (``tiers.dtype``) while ``hkv demo``'s ./hkv-store
keeps the model's float32 ones, so the two never share a folder. See docs/usage.md.
"""

import sys

import torch

import hkv
from hkv.default_model import load_default_model
from hkv.passkey import passkey_answer, passkey_prompt

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
model, tokenizer = load_default_model()                      # SmolLM2-135M-Instruct, fp32, CPU
config = hkv.Config.load({
    "tiers": {"device": "32MiB", "host": "16MiB", "dtype": "float16", "disk": "2GiB", "path": "hkv-store-wrap"},
    "attention": {"mode": "sparse", "budget_tokens": 512},
})
ids, key = passkey_prompt(tokenizer, n_tokens=tokens, depth=0.5)
with hkv.wrap(model, config) as rt:
    out = rt.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    answer = passkey_answer(tokenizer, out[0, len(ids):])
    print(f"key {key} answer {answer or 'no digits'}: {'FOUND' if answer == key else 'NOT found'} ({len(ids)}-token prompt)")
    stats = rt.stats()
    print("used:", ", ".join(f"{name} {usage['used_bytes'] / 2**20:.1f} MiB" for name, usage in stats.tiers.items()))
    p = stats.prefetch  # the sequence's blocks read, each in one bucket: read = pinned + hit + unpredicted + waited + fetched
    rate = f"{100 * p.hit_rate:.0f}%" if p.hit_rate is not None else "-"
    print(f"prefetch hit rate {rate}; {p.read} blocks read = {p.pinned} pinned + {p.hit} predicted, on the device in time + "
          f"{p.unpredicted} on the device, not predicted + {p.waited} waited for + {p.fetched} fetched on demand")
