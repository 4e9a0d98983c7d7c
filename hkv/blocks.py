"""Block identity, layout and the on-disk record format.

A block holds the keys and values of ``block_tokens`` consecutive tokens of one layer:
a tensor of shape ``[2, kv_heads, block_tokens, head_dim]`` (index 0 keys, 1 values).

Its key is ``xxh3_128(model fingerprint, chain hash of the token ids up to the end of the
block, layer)``. The chain hash of block ``i`` is ``xxh3_128(chain[i-1] + token_ids[i])``, so two
sequences with the same prefix share the keys of that prefix's blocks.

On disk a block is a record: a fixed 64-byte header (magic, format version, encoding, dtype,
shape, payload length, xxh3-64 checksum of the payload) followed by the raw payload bytes.
Nothing is pickled.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from .config import ConfigError
from .encoding import CODES, NAMES, decode, encode, encoded_nbytes

FORMAT_VERSION = 1
RECORD_MAGIC = b"HKVB"
KEY_BYTES = 16
ROOT_CHAIN = bytes(KEY_BYTES)  # chain hash "before" the first block

_DTYPE_CODES: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class RecordError(ValueError):
    """A stored record that cannot be used: wrong magic, version, shape, dtype, length or checksum."""


class CorruptRecordError(RecordError):
    """A record whose payload does not match its checksum (or is truncated)."""


class Encoding:
    """How a record's payload is encoded (the header's encoding byte): raw, or one of the lossy
    encodings of :mod:`hkv.encoding`."""

    RAW = CODES["none"]


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Shape and dtype of one block: ``[2, kv_heads, block_tokens, head_dim]``."""

    kv_heads: int
    block_tokens: int
    head_dim: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for name in ("kv_heads", "block_tokens", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BlockLayout.{name} = {getattr(self, name)} must be positive")
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"BlockLayout.dtype = {self.dtype} must be one of {sorted(DTYPE_NAMES)}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, self.kv_heads, self.block_tokens, self.head_dim)

    @property
    def nbytes(self) -> int:
        """Bytes of one block's payload."""
        return 2 * self.kv_heads * self.block_tokens * self.head_dim * self.dtype.itemsize

    @property
    def summary_floats(self) -> int:
        """Values in one block's key summary: min and max per KV head and dimension."""
        return 2 * self.kv_heads * self.head_dim

    @property
    def record_nbytes(self) -> int:
        """Bytes of one block's disk record (header + payload)."""
        return HEADER_SIZE + self.nbytes

    def encoded_record_nbytes(self, encoding: str) -> int:
        """Bytes of one block's disk record under ``encoding`` (``"none"``, ``"int8"``, ``"int4"``)."""
        return HEADER_SIZE + encoded_nbytes(encoding, self.shape, self.dtype.itemsize)

    def describe(self) -> str:
        return (
            f"{self.nbytes} bytes: 2 x {self.kv_heads} kv heads x {self.block_tokens} tokens x "
            f"{self.head_dim} dims x {str(self.dtype).removeprefix('torch.')}"
        )

    def check_budgets(self, budgets: dict[str, int]) -> None:
        """Raise ConfigError naming every ``tiers.<name>`` budget smaller than one block."""
        small = [f"tiers.{name} = {value} bytes" for name, value in budgets.items() if value < self.nbytes]
        if small:
            raise ConfigError(f"{', '.join(small)}: smaller than one block ({self.describe()})")


@dataclass(frozen=True, slots=True, order=True)
class BlockKey:
    """The 16-byte identity of a block; ``bytes(key)`` is its LMDB key."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != KEY_BYTES:
            raise ValueError(f"BlockKey needs {KEY_BYTES} bytes, got {self.digest!r}")

    def __bytes__(self) -> bytes:
        return self.digest

    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> BlockKey:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"not a block key: {text!r} (expected {2 * KEY_BYTES} hex digits)") from None
        return cls(raw)

    @classmethod
    def make(cls, fingerprint: bytes, chain: bytes, layer: int) -> BlockKey:
        """Key of the block of ``layer`` whose token prefix hashes to ``chain``:
        ``xxh3_128(len(fingerprint) u32 LE + fingerprint + chain + layer u32 LE)``."""
        return cls(key_digests(fingerprint, [chain], [layer])[0])

    def __repr__(self) -> str:
        return f"BlockKey({self.digest.hex()[:12]}…)"


def chain_hash(previous: bytes, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
    """Chain hash of one block: ``xxh3_128(previous + int64 little-endian token ids)``."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    ids = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
    return xxhash.xxh3_128_digest(previous + ids.tobytes())


def chain_hashes(token_ids: Sequence[int] | np.ndarray | torch.Tensor, block_tokens: int, previous: bytes = ROOT_CHAIN) -> list[bytes]:
    """Chain hashes of every full block of ``token_ids`` (a trailing partial block is ignored)."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().reshape(-1).numpy()
    ids = np.asarray(token_ids, dtype="<i8")
    chains = []
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        previous = chain_hash(previous, ids[start : start + block_tokens])
        chains.append(previous)
    return chains


def key_digests(fingerprint: bytes, chains: Iterable[bytes], layers: Iterable[int]) -> list[bytes]:
    """The 16-byte digests of :meth:`BlockKey.make` for every chain hash and layer, block-major
    (``chains[0]``'s layers, then ``chains[1]``'s...), without building BlockKey objects."""
    head = len(fingerprint).to_bytes(4, "little") + fingerprint
    tails = [layer.to_bytes(4, "little") for layer in layers]
    digest = xxhash.xxh3_128_digest
    return [digest(head + chain + tail) for chain in chains for tail in tails]


# ---------------------------------------------------------------------------------------------
# Record format. Header, little-endian, 64 bytes:
#   magic 4s | version u16 | encoding u8 | dtype u8 | ndim u8 | pad 3x | shape 4 x u32 |
#   payload bytes u64 | checksum xxh3-64 u64 | key 16s  (the block key, so a record moved under
#   another key is detected) | reserved 4x
_HEADER = struct.Struct("<4sHBBB3x4IQQ16s4x")  # 64 bytes, the last 4 reserved
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True, slots=True)
class RecordHeader:
    version: int
    encoding: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload_nbytes: int
    checksum: int
    key: bytes


def encode_header(key: BlockKey, block: torch.Tensor, payload: memoryview | bytes, encoding: int = Encoding.RAW) -> bytes:
    """The 64-byte header for ``block`` (whose bytes, raw or under ``encoding``, are ``payload``)."""
    if block.dtype not in _DTYPE_CODES:
        raise ValueError(f"cannot store dtype {block.dtype}")
    if block.dim() > 4:
        raise ValueError(f"cannot store a {block.dim()}-d block")
    shape = list(block.shape) + [0] * (4 - block.dim())
    return _HEADER.pack(
        RECORD_MAGIC,
        FORMAT_VERSION,
        encoding,
        _DTYPE_CODES[block.dtype],
        block.dim(),
        *shape,
        len(payload),
        xxhash.xxh3_64_intdigest(payload),
        bytes(key),
    )


def tensor_bytes(block: torch.Tensor) -> memoryview:
    """Raw bytes of a contiguous CPU tensor, without a copy."""
    if block.device.type != "cpu":
        raise ValueError("tensor_bytes needs a CPU tensor")
    flat = block.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def encode_record(key: BlockKey, block: torch.Tensor) -> bytes:
    """Header + payload as one bytes object (for tests and small writes)."""
    payload = tensor_bytes(block.cpu())
    return encode_header(key, block, payload) + payload.tobytes()


def decode_header(record: memoryview | bytes, *, where: str = "record") -> RecordHeader:
    if len(record) < HEADER_SIZE:
        raise CorruptRecordError(f"{where}: truncated ({len(record)} bytes, header needs {HEADER_SIZE})")
    magic, version, encoding, dtype_code, ndim, s0, s1, s2, s3, nbytes, checksum, key = _HEADER.unpack_from(record)
    if magic != RECORD_MAGIC:
        raise RecordError(f"{where}: not an hkv block record (magic {magic!r})")
    if version > FORMAT_VERSION:
        raise RecordError(f"{where}: format version {version} is newer than this hkv ({FORMAT_VERSION}); upgrade hkv")
    if encoding not in NAMES:
        raise RecordError(f"{where}: unknown encoding {encoding} (a newer hkv's?)")
    if dtype_code not in _CODE_DTYPES or ndim > 4:
        raise RecordError(f"{where}: bad dtype code {dtype_code} or ndim {ndim}")
    return RecordHeader(version, encoding, _CODE_DTYPES[dtype_code], (s0, s1, s2, s3)[:ndim], nbytes, checksum, key)


def check_record(record: memoryview | bytes, key: BlockKey | bytes, *, where: str = "record") -> RecordHeader:
    """Check a record's header, key, payload length and checksum without decoding it (a record
    that came over the network); its header. RecordError / CorruptRecordError."""
    header = decode_header(record, where=where)
    if header.key != bytes(key):
        raise RecordError(f"{where}: record belongs to key {header.key.hex()}, not {bytes(key).hex()}")
    payload = memoryview(record)[HEADER_SIZE:]
    if len(payload) != header.payload_nbytes:
        raise CorruptRecordError(f"{where}: truncated payload ({len(payload)} of {header.payload_nbytes} bytes)")
    if xxhash.xxh3_64_intdigest(payload) != header.checksum:
        raise CorruptRecordError(f"{where}: checksum mismatch, the stored block is corrupt")
    return header


def _checked_payload(record: memoryview | bytes, shape: tuple[int, ...], dtype: torch.dtype, key: BlockKey | None,
                     where: str) -> tuple[RecordHeader, memoryview]:  # fmt: skip
    """The header and payload of ``record`` once its header, key, shape, dtype, length and checksum
    match a block of ``shape`` and ``dtype``. RecordError / CorruptRecordError."""
    header = decode_header(record, where=where)
    if key is not None and header.key != bytes(key):
        raise RecordError(f"{where}: record belongs to key {header.key.hex()}, not {key.hex()}")
    if header.dtype != dtype or tuple(header.shape) != shape:
        raise RecordError(f"{where}: stored block is {tuple(header.shape)} {header.dtype}, expected {shape} {dtype}")
    payload = memoryview(record)[HEADER_SIZE:]
    lossy = header.encoding != Encoding.RAW and len(shape) == 4 and shape[0] == 2  # only blocks are ever encoded
    if header.encoding != Encoding.RAW and not lossy:
        raise RecordError(f"{where}: a {NAMES[header.encoding]} record where a raw one is expected")
    expected = encoded_nbytes(NAMES[header.encoding], shape, dtype.itemsize) if lossy else math.prod(shape) * dtype.itemsize
    if len(payload) != header.payload_nbytes or header.payload_nbytes != expected:
        raise CorruptRecordError(f"{where}: truncated payload ({len(payload)} of {header.payload_nbytes} bytes)")
    if xxhash.xxh3_64_intdigest(payload) != header.checksum:
        raise CorruptRecordError(f"{where}: checksum mismatch, the stored block is corrupt")
    return header, payload


def record_prefix(shape: Sequence[int], dtype: torch.dtype, encoding: str, payload_nbytes: int) -> bytes:
    """The first 36 bytes (magic ... payload bytes) of a record of a block of ``shape`` and
    ``dtype`` stored under ``encoding`` (``"none"`` or lossy) with ``payload_nbytes``: what
    :func:`record_matches` compares a header against."""
    dims = list(shape) + [0] * (4 - len(shape))
    return _HEADER.pack(RECORD_MAGIC, FORMAT_VERSION, CODES[encoding], _DTYPE_CODES[dtype], len(shape), *dims,
                        payload_nbytes, 0, bytes(KEY_BYTES))[:_PREFIX]  # fmt: skip


_PREFIX = 36  # magic ... payload bytes; then the checksum and the key
_CHECKSUM = struct.Struct("<Q16s")


def record_matches(head: memoryview | bytes, payload: memoryview, expected: bytes, key: bytes) -> bool:
    """The read path's fast case: whether ``head`` (a record's 64-byte header) starts with
    ``expected`` (:func:`record_prefix`: same version, encoding, dtype, shape and size), names
    ``key``, and its checksum matches ``payload`` (read straight into its destination). False
    for anything else: the caller then reads the record whole and checks it with
    :func:`read_into` / :func:`decode_into`, which name the problem."""
    if len(head) != HEADER_SIZE or head[:_PREFIX] != expected:
        return False
    checksum, stored_key = _CHECKSUM.unpack_from(head, _PREFIX)
    return stored_key == key and xxhash.xxh3_64_intdigest(payload) == checksum


def decode_into(record: memoryview | bytes, out: torch.Tensor, key: BlockKey | None = None, *, where: str = "record") -> None:
    """Check ``record`` (header, length, checksum, key) and copy its payload into ``out`` (CPU).

    Reads straight from ``record`` (e.g. an LMDB memory map) into ``out``: no intermediate bytes.
    Raises RecordError / CorruptRecordError with ``where`` in the message.
    """
    deferred = read_into(record, out, key, where=where)
    if deferred is not None:
        codes = torch.frombuffer(bytearray(deferred[1]), dtype=torch.uint8)  # a copy: the map is read-only
        decode(codes.unsqueeze(0), deferred[0], out.unsqueeze(0))


def read_into(record: memoryview | bytes, out: torch.Tensor, key: BlockKey | None = None, *,
              where: str = "record") -> tuple[str, memoryview] | None:  # fmt: skip
    """:func:`decode_into` without the decode of a lossy record: a raw record's payload is copied
    into ``out`` (None returned); a lossy one's is returned as ``(encoding, payload)`` (a view of
    ``record``, valid while it is) for the caller to decode, with others in one batch."""
    header, payload = _checked_payload(record, tuple(out.shape), out.dtype, key, where)
    if out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("decode_into needs a contiguous CPU tensor")
    if header.encoding != Encoding.RAW:
        return NAMES[header.encoding], payload
    # numpy copies straight from the (possibly read-only, memory-mapped) buffer into ``out``.
    np.copyto(out.view(-1).view(torch.uint8).numpy(), np.frombuffer(payload, dtype=np.uint8))
    return None


def payload_into(record: memoryview | bytes, out: torch.Tensor, layout: BlockLayout, encoding: str, key: BlockKey | None = None,
                 *, where: str = "record") -> None:  # fmt: skip
    """Check a block record of ``layout`` and write the block in the lossy ``encoding`` into ``out``
    (``[payload bytes]`` uint8, CPU): the payload as it is when the record is stored in
    ``encoding`` (no decode and re-encode, which would round twice), else decoded and encoded."""
    header, payload = _checked_payload(record, layout.shape, layout.dtype, key, where)
    if header.encoding == CODES[encoding]:
        np.copyto(out.numpy(), np.frombuffer(payload, dtype=np.uint8))
        return
    block = torch.empty(layout.shape, dtype=layout.dtype)
    decode_into(record, block, key, where=where)
    out.copy_(encode(block.unsqueeze(0), encoding)[0])
