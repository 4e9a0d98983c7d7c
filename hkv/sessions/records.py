"""Session records: names, model identity, the committed record and what the store reports.

Encodings (docs/sessions-design.md): a record is msgpack followed by its xxh3-64 (8 bytes LE);
token ids are int32 LE bytes when they fit, else int64 (``token_bytes`` says which). Nothing is
pickled. :mod:`.session_store` stores them; this module only encodes, decodes and checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgpack
import numpy as np
import xxhash

from ..blocks import DTYPE_NAMES, BlockKey, chain_hashes, key_digests
from ..errors import TierError
from ..store.checksum import CHECKSUM_BYTES, checksum

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
RECORD_VERSION = 1


class SessionError(TierError):
    """Base of the session errors below (a TierError, so callers catching store errors see it)."""


class SessionNameError(SessionError, ValueError):
    """A session name that is empty, too long or has characters outside ``A-Z a-z 0-9 . _ -``."""


class SessionNotFoundError(SessionError, KeyError):
    """No session of that name in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SessionLockedError(SessionError):
    """The session is open for writing elsewhere (another process, or another Session here)."""


class SessionMismatchError(SessionError):
    """The session was saved by another model or block layout; the message names each difference."""


class CorruptSessionError(SessionError):
    """A session's record or tail fails its checksum or cannot be decoded; names the session."""


def check_name(name: str) -> str:
    """``name`` if valid, else SessionNameError saying what is wrong with it."""
    rule = "1 to 128 characters of A-Z a-z 0-9 . _ -, not starting with '.'"
    if not isinstance(name, str):
        raise SessionNameError(f"a session name must be a string, not {type(name).__name__}; use {rule}")
    if not name:
        raise SessionNameError(f"the session name is empty; use {rule}")
    if len(name) > 128:
        raise SessionNameError(f"session name {name[:20]!r}... is {len(name)} characters long; use {rule}")
    bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
    if bad:
        raise SessionNameError(f"session name {name!r} has characters {''.join(bad)!r}; use {rule}")
    if name.startswith("."):
        raise SessionNameError(f"session name {name!r} starts with '.'; use {rule}")
    assert NAME_PATTERN.fullmatch(name)
    return name


def _plain(value: object) -> object:
    """Tuples as lists, as a msgpack round trip gives them (so stored and live values compare)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(slots=True)
class ModelIdentity:
    """Who produced a session's KV. ``fingerprint``: 32 hex chars (hkv.integrations.model.model_fingerprint)."""

    fingerprint: str
    description: dict[str, object]  # class, model_type, num_layers, num_q_heads, num_kv_heads, head_dim,
    # hidden_size, vocab_size, weights_dtype, kv_dtype, weights_sample (hex)
    tokenizer: str | None = None  # hex hash of the tokenizer's vocabulary and special tokens, if known

    def differences(self, other: ModelIdentity) -> list[str]:
        """Human-readable ``"field: stored X, this model Y"`` lines (``self`` is the stored
        identity, ``other`` this model's); empty when they match. A tokenizer of None on either
        side is not a difference."""
        mine, theirs = _plain(self.description), _plain(other.description)
        lines = [
            f"{name}: stored {mine.get(name, '(none)')}, this model {theirs.get(name, '(none)')}"
            for name in dict.fromkeys([*mine, *theirs])
            if mine.get(name) != theirs.get(name)
        ]
        if self.tokenizer is not None and other.tokenizer is not None and self.tokenizer != other.tokenizer:
            lines.append(f"tokenizer: stored {self.tokenizer}, this model {other.tokenizer}")
        if self.fingerprint != other.fingerprint:
            lines.append(f"fingerprint: stored {self.fingerprint}, this model {other.fingerprint}")
        return lines

    def to_dict(self) -> dict[str, object]:
        return {"fingerprint": self.fingerprint, **_plain(self.description), "tokenizer": self.tokenizer}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ModelIdentity:
        rest = dict(data)
        fingerprint, tokenizer = rest.pop("fingerprint"), rest.pop("tokenizer", None)
        if not isinstance(fingerprint, str) or (tokenizer is not None and not isinstance(tokenizer, str)):
            raise TypeError("fingerprint / tokenizer must be hex strings")
        return cls(fingerprint, rest, tokenizer)


@dataclass(slots=True)
class SessionRecord:
    """One committed session (see docs/sessions-design.md). ``token_ids``: int64 numpy ``[n]``."""

    name: str
    identity: ModelIdentity
    layout: dict[str, object]  # kv_heads, block_tokens, head_dim, dtype (as DiskTier stores it)
    token_ids: np.ndarray
    kv_tokens: int = 0
    kv_blocks: int = 0
    tail_tokens: int = 0
    created: float = 0.0
    updated: float = 0.0
    last_used: float = 0.0
    commits: int = 0
    version: int = RECORD_VERSION

    @property
    def block_tokens(self) -> int:
        return int(self.layout["block_tokens"])

    @property
    def num_layers(self) -> int:
        return int(self.identity.description["num_layers"])

    def check(self) -> None:
        """ValueError naming the first inconsistency between the counts (tokens, blocks, tail)."""
        if not isinstance(self.identity.description.get("num_layers"), int) or self.num_layers < 1:
            raise ValueError(f"identity num_layers = {self.identity.description.get('num_layers')!r} must be a positive int")
        try:
            fingerprint = bytes.fromhex(self.identity.fingerprint)
        except ValueError:
            fingerprint = b""
        if not fingerprint:
            raise ValueError(f"identity fingerprint {self.identity.fingerprint!r} is not hex")
        for name in ("kv_heads", "block_tokens", "head_dim"):
            if not isinstance(self.layout.get(name), int) or self.layout[name] < 1:
                raise ValueError(f"layout {name} = {self.layout.get(name)!r} must be a positive int")
        if self.layout.get("dtype") not in DTYPE_NAMES:
            raise ValueError(f"layout dtype {self.layout.get('dtype')!r} must be one of {sorted(DTYPE_NAMES)}")
        if min(self.kv_tokens, self.kv_blocks, self.tail_tokens) < 0 or self.tail_tokens >= self.block_tokens:
            raise ValueError(f"kv_blocks {self.kv_blocks}, tail_tokens {self.tail_tokens}: negative, or a tail of a whole block")
        if self.kv_tokens != self.kv_blocks * self.block_tokens + self.tail_tokens:
            raise ValueError(
                f"kv_tokens {self.kv_tokens} != kv_blocks {self.kv_blocks} x {self.block_tokens} + tail_tokens {self.tail_tokens}"
            )
        if self.kv_tokens > len(self.token_ids):
            raise ValueError(f"kv_tokens {self.kv_tokens} > {len(self.token_ids)} token ids")

    def key_digests(self, first: int = 0) -> list[bytes]:
        """Digests of the referenced blocks' keys from block ``first`` on, block-major (block i's
        layers 0..L-1, then block i+1's): :func:`hkv.blocks.key_digests`."""
        chains = chain_hashes(self.token_ids[: self.kv_blocks * self.block_tokens], self.block_tokens)
        return key_digests(bytes.fromhex(self.identity.fingerprint), chains[first:], range(self.num_layers))

    def to_bytes(self) -> bytes:
        """msgpack payload followed by its 8-byte xxh3-64 (no pickle)."""
        ids = np.asarray(self.token_ids).reshape(-1)
        narrow = ids.size == 0 or (int(ids.min()) >= -(2**31) and int(ids.max()) < 2**31)
        body = {
            "version": self.version, "name": self.name, "identity": self.identity.to_dict(), "layout": _plain(self.layout),
            "token_ids": ids.astype("<i4" if narrow else "<i8").tobytes(), "token_bytes": 4 if narrow else 8,
            "kv_tokens": int(self.kv_tokens), "kv_blocks": int(self.kv_blocks), "tail_tokens": int(self.tail_tokens),
            "created": float(self.created), "updated": float(self.updated), "last_used": float(self.last_used),
            "commits": int(self.commits),
        }  # fmt: skip
        payload = msgpack.packb(body, use_bin_type=True)
        return payload + checksum(payload)

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> SessionRecord:
        """Decode; CorruptSessionError naming the session on a bad checksum or shape; a record
        of a newer version -> SessionError saying so."""
        data = bytes(data)
        if len(data) <= CHECKSUM_BYTES:
            raise CorruptSessionError(f"session {name!r}: record truncated ({len(data)} bytes)")
        payload, digest = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
        if checksum(payload) != digest:
            raise CorruptSessionError(f"session {name!r}: record checksum mismatch (corrupt or truncated record)")
        try:
            body = msgpack.unpackb(payload, raw=False)
            version = body["version"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as error:
            raise CorruptSessionError(f"session {name!r}: record does not decode: {error}") from None
        if isinstance(version, int) and version > RECORD_VERSION:
            raise SessionError(
                f"session {name!r}: record version {version} is newer than this hkv ({RECORD_VERSION}); upgrade hkv"
            )
        try:
            width = body["token_bytes"]
            record = cls(
                name=body["name"], identity=ModelIdentity.from_dict(body["identity"]), layout=dict(body["layout"]),
                token_ids=np.frombuffer(body["token_ids"], dtype={4: "<i4", 8: "<i8"}[width]).astype(np.int64),
                kv_tokens=body["kv_tokens"], kv_blocks=body["kv_blocks"], tail_tokens=body["tail_tokens"],
                created=float(body["created"]), updated=float(body["updated"]), last_used=float(body["last_used"]),
                commits=body["commits"], version=version,
            )  # fmt: skip
            if record.name != name:
                raise ValueError(f"the record is of session {record.name!r}")
            if not all(isinstance(v, int) for v in (record.kv_tokens, record.kv_blocks, record.tail_tokens, record.commits)):
                raise TypeError("counts must be ints")
            record.check()
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise CorruptSessionError(f"session {name!r}: bad record: {error}") from None
        return record


def tail_key(name: str) -> BlockKey:
    """The key a session's tail record is filed under (so a tail moved to another name is detected)."""
    return BlockKey(xxhash.xxh3_128_digest(b"hkv session tail\0" + name.encode()))


@dataclass(slots=True)
class SessionInfo:
    """What ``hkv sessions ls`` shows for one session, read without touching block data."""

    name: str
    tokens: int
    kv_tokens: int
    kv_blocks: int  # per layer
    num_layers: int
    stored_bytes: int  # record bytes of the blocks it references (shared ones counted fully) + tail
    shared_blocks: int  # of its blocks (all layers), those with refs > 1
    missing_blocks: int  # referenced blocks no longer in the store (should be 0)
    model: str  # e.g. "LlamaForCausalLM 30x9/3x64 float32 fp=1a2b3c4d"; for a corrupt one, the error
    created: float
    updated: float
    last_used: float
    commits: int


@dataclass(slots=True)
class VerifyReport:
    """``hkv sessions verify``: per session, the problems found (empty list = intact)."""

    problems: dict[str, list[str]]
    checked_blocks: int
    checked_bytes: int

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())
