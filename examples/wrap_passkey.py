import torch
import hkv
from hkv.default_model import load_default_model
from hkv.passkey import passkey_prompt, passkey_answer

model, tokenizer = load_default_model()                      # SmolLM2-135M-Instruct, fp32, CPU
config = hkv.Config.load({
    "tiers": {"device": "32MiB", "host": "16MiB", "dtype": "float16", "disk": "2GiB", "path": "hkv-store"},
    "attention": {"mode": "sparse", "budget_tokens": 512},
})
ids, key = passkey_prompt(tokenizer, n_tokens=2048, depth=0.5)
with hkv.wrap(model, config) as rt:
    out = rt.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    print("key", key, "answer", passkey_answer(tokenizer, out[0, len(ids):]))
    stats = rt.stats()
    print({name: usage["used_bytes"] for name, usage in stats.tiers.items()}, "hit rate", stats.prefetch.hit_rate)
