"""The checksum of the store's small rows (summaries, session records): xxh3-64, 8 bytes LE.

Block records carry their own in their header (:mod:`hkv.blocks`).
"""

from __future__ import annotations

import xxhash

CHECKSUM_BYTES = 8  # an xxh3-64 digest, little-endian


def checksum(payload: bytes | memoryview) -> bytes:
    """``payload``'s 8-byte checksum."""
    return xxhash.xxh3_64_intdigest(payload).to_bytes(CHECKSUM_BYTES, "little")
