"""A conversation that survives the process: run this twice.

    python examples/persist_chat.py "My name is Ada. Please remember it."
    python examples/persist_chat.py "What is my name?"

The first run creates the session "example" in ./hkv-store-example and commits it; the second
(a new process) resumes it from the store -- its KV is adopted, not recomputed -- and answers
with the first turn in context. See docs/sessions.md.
"""

from __future__ import annotations

import sys

import hkv
from hkv.cli.chat import TurnEncoder
from hkv.default_model import load_default_model

model, tokenizer = load_default_model()  # SmolLM2-135M-Instruct, fp32, CPU
config = hkv.Config.load({"tiers": {"path": "hkv-store-example"}})
encoder = TurnEncoder(tokenizer, system="You are a helpful assistant. Answer in one sentence.")

with hkv.wrap(model, config) as rt, rt.session("example", tokenizer=tokenizer) as session:
    restored = session.restored
    print("new session" if restored.new else f"resumed {restored.tokens} tokens in {restored.seconds:.2f} s")
    for text in sys.argv[1:] or ["My name is Ada. Please remember it."]:
        new_ids = encoder.ids(text, history=session.tokens)  # chat template of the new turn only
        start = len(session.tokens) + new_ids.shape[1]
        out = session.generate(new_ids, max_new_tokens=40, do_sample=False)  # commits the turn
        print(f"> {text}\n{tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()}")
    print(f"session 'example': {len(session.tokens)} tokens")
