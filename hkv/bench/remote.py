"""``hkv bench remote``: block reads from the remote tier against a raw pipelined GET loop of the
same bytes on the same server, side by side in one run (issue 19's target: >= 0.5).

The remote tier's read is what a pull does: ``RemoteStore.get_blocks`` (``MGET`` in chunks of
256 keys over the client's pool) and every record checked (header, key, xxh3 checksum:
:func:`hkv.blocks.check_record`). The baseline is a plain redis-py client sending ``GET`` for
each key in pipelines of the same size, reading nothing else and checking nothing. Best of
``repeats`` interleaved runs of each.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
import torch

from ..blocks import BlockKey, check_record, encode_record
from ..config import RemoteConfig
from ..remote.client import CHUNK, RemoteStore
from .disk import SMOLLM2_LAYOUT


@dataclass(slots=True)
class RemoteFigures:
    """GB/s (10^9 B/s) of record bytes read; ``ratio`` = tier / raw."""

    tier_read_gbps: float
    raw_get_gbps: float
    ratio: float
    blocks: int
    record_bytes: int
    repeats: int
    url: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_remote(url: str, *, blocks: int = 2048, repeats: int = 3, prefix: str = "hkv-bench") -> RemoteFigures:
    """Write ``blocks`` SmolLM2-shaped fp16 records under ``prefix`` on the server at ``url``,
    time both reads, delete them."""
    remote = RemoteStore(RemoteConfig(url=url, key_prefix=prefix, timeout_s=30.0))
    raw = redis.Redis.from_url(url, socket_timeout=30.0)
    keys = [i.to_bytes(4, "little") * 4 for i in range(blocks)]
    block = torch.randn(SMOLLM2_LAYOUT.shape).to(SMOLLM2_LAYOUT.dtype)
    records = [(key, encode_record(BlockKey(key), block)) for key in keys]
    if not remote.put_blocks(records):
        raise RuntimeError(f"remote tier {url} is unreachable")
    names = [remote.block_name(key) for key in keys]
    total = sum(len(record) for _, record in records)
    best = {"tier": float("inf"), "raw": float("inf")}
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for key, value in zip(keys, remote.get_blocks(keys)):
                check_record(value, key)
            best["tier"] = min(best["tier"], time.perf_counter() - start)
            start = time.perf_counter()
            got = 0
            for begin in range(0, len(names), CHUNK):
                pipe = raw.pipeline(transaction=False)
                for name in names[begin : begin + CHUNK]:
                    pipe.get(name)
                got += sum(len(value) for value in pipe.execute())
            best["raw"] = min(best["raw"], time.perf_counter() - start)
            if got != total:
                raise RuntimeError(f"raw GETs read {got} of {total} bytes")
    finally:
        for begin in range(0, len(names), CHUNK):
            raw.delete(*names[begin : begin + CHUNK])
        raw.close()
        remote.close()
    tier, base = total / best["tier"] / 1e9, total / best["raw"] / 1e9
    return RemoteFigures(round(tier, 3), round(base, 3), round(tier / base, 3), blocks, total, repeats, url)
