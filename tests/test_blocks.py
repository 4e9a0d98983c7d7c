"""Block keys (stable across processes, chained by prefix) and the record format."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from hkv.blocks import (
    HEADER_SIZE,
    ROOT_CHAIN,
    BlockKey,
    BlockLayout,
    CorruptRecordError,
    RecordError,
    key_digests,
    chain_hashes,
    decode_header,
    decode_into,
    encode_record,
)

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
FINGERPRINT = b"model-fingerprint"


def keys_for(token_ids: list[int]) -> list[str]:
    chains = chain_hashes(token_ids, block_tokens=4)
    return [key.hex() for key in key_digests(FINGERPRINT, chains, range(2))]


def test_layout_shape_and_bytes() -> None:
    assert LAYOUT.shape == (2, 2, 4, 8)
    assert LAYOUT.nbytes == 2 * 2 * 4 * 8 * 2
    assert BlockLayout(3, 64, 64).nbytes == 48 * 1024  # SmolLM2, fp16
    with pytest.raises(ValueError, match="kv_heads"):
        BlockLayout(0, 4, 8)
    with pytest.raises(ValueError, match="dtype"):
        BlockLayout(1, 4, 8, dtype=torch.int8)


def test_chain_hash_shares_prefixes_and_ignores_partial_blocks() -> None:
    a = chain_hashes(list(range(12)), block_tokens=4)
    b = chain_hashes(list(range(8)) + [99, 10, 11, 12, 13], block_tokens=4)
    assert len(a) == 3 and len(b) == 3
    assert a[:2] == b[:2] and a[2] != b[2]
    # a block's key depends on everything before it, not only on its own tokens
    c = chain_hashes([7, 1, 2, 3] + list(range(4, 8)), block_tokens=4)
    assert c[1] != a[1]
    assert chain_hashes(torch.arange(12), 4) == a == chain_hashes(np.arange(12, dtype=np.int32), 4)


def test_keys_differ_by_layer_and_fingerprint() -> None:
    chain = chain_hashes(list(range(4)), 4)[0]
    keys = {BlockKey.make(FINGERPRINT, chain, 0), BlockKey.make(FINGERPRINT, chain, 1), BlockKey.make(b"other", chain, 0)}
    assert len(keys) == 3
    assert BlockKey.make(FINGERPRINT, ROOT_CHAIN, 0) != BlockKey.make(FINGERPRINT, chain, 0)


def test_keys_are_stable_across_processes() -> None:
    ids = list(range(100, 120))
    code = (
        "from hkv.blocks import chain_hashes, key_digests;"
        f"print(' '.join(k.hex() for k in key_digests({FINGERPRINT!r}, chain_hashes({ids!r}, 4), range(2))))"
    )
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env={"PYTHONHASHSEED": "123"})
    assert other.stdout.split() == keys_for(ids)


def test_key_bytes_and_hex_round_trip() -> None:
    key = BlockKey.make(FINGERPRINT, ROOT_CHAIN, 3)
    assert BlockKey(bytes(key)) == key == BlockKey.from_hex(key.hex())
    with pytest.raises(ValueError, match="16 bytes"):
        BlockKey(b"short")
    with pytest.raises(ValueError, match="not a block key"):
        BlockKey.from_hex("zz")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_record_round_trip_is_bitwise(dtype: torch.dtype) -> None:
    layout = BlockLayout(2, 4, 8, dtype)
    key = BlockKey.make(FINGERPRINT, ROOT_CHAIN, 0)
    block = torch.randn(layout.shape).to(dtype)
    record = encode_record(key, block)
    assert len(record) == layout.record_nbytes == HEADER_SIZE + layout.nbytes
    header = decode_header(record)
    assert header.shape == layout.shape and header.dtype == dtype and header.key == bytes(key)
    out = torch.empty(layout.shape, dtype=dtype)
    decode_into(memoryview(record), out, key)
    assert torch.equal(out.view(torch.uint8), block.view(torch.uint8))


def test_record_errors_are_named() -> None:
    key = BlockKey.make(FINGERPRINT, ROOT_CHAIN, 0)
    block = torch.randn(LAYOUT.shape).half()
    record = bytearray(encode_record(key, block))
    out = torch.empty(LAYOUT.shape, dtype=torch.float16)

    flipped = bytearray(record)
    flipped[HEADER_SIZE + 5] ^= 0xFF
    with pytest.raises(CorruptRecordError, match="blk-7: checksum mismatch"):
        decode_into(flipped, out, key, where="blk-7")
    with pytest.raises(CorruptRecordError, match="truncated"):
        decode_into(record[:-10], out, key)
    with pytest.raises(CorruptRecordError, match="truncated"):
        decode_into(record[:20], out, key)
    with pytest.raises(RecordError, match="not an hkv block record"):
        decode_into(b"XXXX" + record[4:], out, key)
    future = bytearray(record)
    future[4:6] = (99).to_bytes(2, "little")
    with pytest.raises(RecordError, match="format version 99 is newer"):
        decode_into(future, out, key)
    with pytest.raises(RecordError, match="belongs to key"):
        decode_into(record, out, BlockKey.make(FINGERPRINT, ROOT_CHAIN, 1))
    with pytest.raises(RecordError, match="expected"):
        decode_into(record, torch.empty(LAYOUT.shape, dtype=torch.float32), key)
