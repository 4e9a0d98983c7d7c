"""The benches' view of a store's files: ``data.mdb`` and the segment files beside it, so that a
"cold" measurement drops them all from the page cache and a store's size counts them all."""

from __future__ import annotations

from pathlib import Path

import torch

from hkv.bench.disk import drop_store_pages, store_files, store_nbytes
from hkv.bench.resume import cached_fraction
from hkv.blocks import BlockKey, BlockLayout
from hkv.tiers.disk import DiskTier

LAYOUT = BlockLayout(kv_heads=2, block_tokens=16, head_dim=8, dtype=torch.float32)


def test_store_files_name_the_segments_and_their_pages_can_be_dropped(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert store_files(store) == [] and store_nbytes(store) is None
    keys = [BlockKey(i.to_bytes(16, "little")) for i in range(8)]
    with DiskTier(store, LAYOUT, 64 * LAYOUT.record_nbytes) as tier:
        tier.put_many(keys, torch.randn(8, *LAYOUT.shape))
    files = store_files(store)
    assert files[0] == store / "data.mdb" and len(files) >= 2  # the records live in segment files
    assert all(path.suffix == ".seg" for path in files[1:])
    assert store_nbytes(store) == sum(path.stat().st_size for path in files) >= 8 * LAYOUT.nbytes
    for path in files:
        path.read_bytes()  # into the page cache
    assert drop_store_pages(store) == "ok"
    cached = cached_fraction(files)
    if cached is not None and not _on_tmpfs(store):  # None where fincore is missing; tmpfs pages cannot be dropped
        assert cached < 0.5
        for path in files:
            path.read_bytes()
        assert drop_store_pages(store, records_only=True) == "ok"  # the block records, not the index
        assert cached_fraction(files[1:]) < 0.5 and cached_fraction(files[:1]) > 0.5


def _on_tmpfs(path: Path) -> bool:
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines() if len(line.split()) > 2]
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1]), default=None)
    return best is not None and best[2] == "tmpfs"
