"""`hkv tune`: measure this machine, plan tier budgets, encodings and prefetch for a model and a
context length, and predict the decode step (``machine`` measures, ``compute`` times the
model's own step, ``plan`` holds the cost model and the plan; docs/tuning.md)."""
