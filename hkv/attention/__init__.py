"""Attention over tiered KV: block selection, the per-sequence KV, the log-sum-exp accumulator.

``accumulator`` merges attention over KV given in pieces; ``selection`` keeps the block
summaries and picks the blocks a query reads (Quest bounds); ``sequence`` is one sequence's KV
over all layers (``SequenceKV``), backed by the tier manager; ``stats`` what it read and from
where; ``prefix`` adopts stored blocks instead of computing them.
"""
