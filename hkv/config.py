"""Typed configuration for hkv.

A config comes from defaults, a TOML file, a dict or keyword arguments, and the environment,
in that order of precedence (later wins): ``HKV_TIERS__HOST=8GiB`` overrides ``[tiers] host``.
Everything is validated once, at load; an unknown key or an impossible value raises
:class:`ConfigError` naming the key, the value and what is allowed.

Byte sizes accept integers (bytes) or strings such as ``"512MiB"``, ``"8GiB"``, ``"1.5GB"``.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

ENV_PREFIX = "HKV_"
ENV_DELIMITER = "__"
# prefetch.enabled = "auto" turns the prefetcher on with a GPU, or on a CPU with at least this many
# cores: on fewer its threads take cores the model computes on (2 cores, 8K tokens, SmolLM2's
# shape: the decode step 101.9 ms with it, 60.4 ms without; docs/benchmarks.md)
AUTO_PREFETCH_MIN_CORES = 4


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def prefetch_pays(gpu: bool, cores: int) -> bool:
    """Whether ``prefetch.enabled = "auto"`` turns the prefetcher on: with a GPU device, or on a CPU
    with at least :data:`AUTO_PREFETCH_MIN_CORES` cores."""
    return gpu or cores >= AUTO_PREFETCH_MIN_CORES


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key(s) and value(s)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TiersConfig(_Section):
    """Byte budgets of the three tiers and where the disk tier lives.

    Each budget is a hard bound on the bytes of block data the tier holds.
    """

    device: ByteSize = Field(ByteSize(256 * 2**20), description="device tier budget (GPU HBM, or CPU RAM without a GPU)")
    host: ByteSize = Field(ByteSize(2 * 2**30), description="host tier budget (pinned RAM on a GPU machine)")
    disk: ByteSize = Field(ByteSize(16 * 2**30), description="disk tier budget; also the LMDB map size")
    path: Path = Field(Path("hkv-store"), description="folder of the LMDB store")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="storage dtype of blocks; auto = the model's dtype (exact)"
    )
    accelerator: str = Field("auto", description="torch device of the device tier: auto, cpu, cuda, cuda:N")
    policy: Literal["lru", "score"] = Field("lru", description="eviction policy of device and host tiers")
    disk_full: Literal["evict", "refuse"] = Field(
        "evict", description="when the disk budget is reached: evict unreferenced blocks (LRU) or refuse the write"
    )
    disk_encoding: Literal["none", "int8", "int4"] = Field(
        "none", description="how blocks are stored on disk: none (exact), or lossy int8 / int4 (sparse attention only)"
    )
    host_encoding: Literal["none", "int8", "int4"] = Field(
        "none", description="how blocks are stored in host RAM: none (exact), or lossy int8 / int4 (sparse attention only)"
    )

    @field_validator("device", "host", "disk", mode="before")
    @classmethod
    def _size_type(cls, value: Any) -> Any:
        if isinstance(value, bool) or isinstance(value, float) or not isinstance(value, (int, str)):
            raise ValueError("must be a whole number of bytes or a size string such as 512MiB")
        return value

    @field_validator("device", "host", "disk")
    @classmethod
    def _positive(cls, value: ByteSize) -> ByteSize:
        if int(value) <= 0:
            raise ValueError("must be a positive byte size such as 512MiB")
        return value

    @field_validator("path")
    @classmethod
    def _path_not_file(cls, value: Path) -> Path:
        if "\x00" in str(value):
            raise ValueError("must not contain a NUL character")
        if value.exists() and not value.is_dir():
            raise ValueError(f"{str(value)!r} exists and is not a folder; the store needs a folder")
        return value

    @field_validator("accelerator")
    @classmethod
    def _accelerator(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError("must be one of auto, cpu, cuda, cuda:N")
        return value


class AttentionConfig(_Section):
    """Which blocks attention reads. Token counts are in tokens, not blocks."""

    mode: Literal["exact", "sparse"] = Field("sparse", description="exact reads every block; sparse the top blocks")
    block_tokens: StrictInt = Field(64, description="tokens per KV block")
    budget_tokens: StrictInt = Field(2048, description="tokens attention reads per step in sparse mode, sink and local included")
    sink_tokens: StrictInt = Field(64, description="first tokens always attended and kept on the device")
    local_tokens: StrictInt = Field(256, description="newest tokens always attended and kept on the device")
    prefill_chunk_tokens: StrictInt = Field(1024, description="prompt tokens processed per chunk during prefill")
    positions: Literal["original", "remap"] = Field(
        "original",
        description='rotary positions of far blocks: "original" keeps them; "remap" (sparse mode only) moves the selected '
        "far blocks just before the local window, so distances stay within the model's trained length (InfLLM)",
    )
    cuda_graphs: StrictBool = Field(
        True,
        description="on a GPU, replay a decode step's attention over a layer whose blocks are all on the device from a "
        "CUDA graph captured once per block boundary (one launch instead of a few dozen; same result); no effect elsewhere",
    )

    @field_validator("block_tokens")
    @classmethod
    def _block_tokens(cls, value: int) -> int:
        if value <= 0 or value & (value - 1):
            raise ValueError("must be a positive power of two (16, 32, 64, 128...)")
        return value

    @field_validator("budget_tokens", "prefill_chunk_tokens")
    @classmethod
    def _positive_tokens(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be a positive number of tokens")
        return value

    @field_validator("sink_tokens", "local_tokens")
    @classmethod
    def _non_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be zero or a positive number of tokens")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AttentionConfig:
        for name in ("sink_tokens", "local_tokens", "budget_tokens"):
            if getattr(self, name) % self.block_tokens:
                raise ValueError(f"{name} = {getattr(self, name)} must be a multiple of block_tokens = {self.block_tokens}")
        floor = self.sink_tokens + self.local_tokens + self.block_tokens
        if self.mode == "sparse" and self.budget_tokens < floor:
            raise ValueError(
                f"budget_tokens = {self.budget_tokens} must be at least sink_tokens + local_tokens + block_tokens = {floor}"
            )
        if self.positions == "remap" and self.mode != "sparse":
            raise ValueError(
                f'positions = "remap" needs mode = "sparse" (mode = {self.mode!r} reads every block at its original position); '
                'set attention.mode = "sparse" or attention.positions = "original"'
            )
        return self


class PrefetchConfig(_Section):
    """The asynchronous prefetcher that moves predicted blocks up the tiers."""

    enabled: StrictBool | Literal["auto"] = Field(
        "auto", description='run the asynchronous prefetcher: true, false, or "auto" (on with a GPU, or on a CPU with at least 4 cores)'
    )
    lookahead: StrictInt = Field(1, description="not read by this version (the prediction is always for the next step, or with next_layer for the next layer); validated so that configs that set it still load")
    workers: StrictInt = Field(2, description="threads reading from the lower tiers")
    margin: float = Field(0.25, description="extra candidates prefetched, as a fraction of the selected blocks")
    job_blocks: StrictInt = Field(16, description="blocks per worker job: a submission is split into jobs of this many blocks "
                                  "spread over the workers; each job's disk reads are one batch in flight together")
    next_layer: StrictBool = Field(False, description="at decode steps, predict layer l + 1's blocks from layer l's input "
                                   "(models with the Llama layer layout) and prefetch them while layer l computes; off by "
                                   "default: on a 2-core CPU it read more and ran slower (docs/benchmarks.md)")

    def on(self, gpu: bool, cores: int | None = None) -> bool:
        """``enabled`` resolved for a run on a GPU device (``gpu``) or a CPU with ``cores`` cores
        (default: this process's): "auto" is :func:`prefetch_pays`."""
        if self.enabled != "auto":
            return bool(self.enabled)
        return prefetch_pays(gpu, cpu_cores() if cores is None else cores)

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, value: Any) -> Any:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError('must be true, false or "auto"')

    @field_validator("lookahead", "workers", "job_blocks")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("margin", mode="before")
    @classmethod
    def _margin_type(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number between 0 and 4")
        return value

    @field_validator("margin")
    @classmethod
    def _margin(cls, value: float) -> float:
        if not 0.0 <= value <= 4.0:
            raise ValueError("must be between 0 and 4")
        return value


class StoreConfig(_Section):
    """Persistence of blocks on the disk tier."""

    persist: StrictBool = Field(False, description="write every sealed block through to disk")
    writer_batch: StrictInt = Field(64, description="blocks per LMDB write transaction")
    direct_reads: StrictBool = Field(
        False, description="read disk blocks kept in LMDB (format 2) with O_DIRECT, many at once, instead of through LMDB's map"
    )
    segments: StrictBool = Field(
        True, description="write block records to append-only segment files beside the LMDB index (store format 3); false: inside LMDB (format 2)"
    )
    aio_reads: StrictBool = Field(
        True, description="read a batch of segment records with Linux native AIO and O_DIRECT, all in one submission; false, or where the OS or filesystem lacks them: through the page cache"
    )
    reuse_prefix: StrictBool = Field(True, description="adopt the longest stored prefix of a prompt instead of prefilling it")
    evict_sessions: StrictBool = Field(
        True, description='with tiers.disk_full = "evict": when unreferenced blocks are not enough, drop the KV of least-recently-used sessions'
    )

    @field_validator("writer_batch")
    @classmethod
    def _batch(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value


class RemoteConfig(_Section):
    """A remote tier on Redis (or Valkey) for sessions, shared by every machine that names it."""

    url: str = Field("", description="redis://host:port/db of the server (a cluster: its nodes, comma-separated); empty: no remote tier")
    key_prefix: str = Field("hkv", description="prefix of every key hkv writes on the server")
    timeout_s: float = Field(2.0, description="seconds a server call may take before the server counts as down")
    lease_s: float = Field(30.0, description="seconds a session's writer lease lasts without renewal (a crashed writer's expires)")
    sessions: StrictBool = Field(True, description="commit sessions to the remote tier and resume them from it")
    prefixes: StrictBool = Field(
        False, description="push the blocks a plain rt.generate stores (store.persist) too, for other machines' prompts"
    )
    cluster: StrictBool = Field(False, description="url names one node of a Redis Cluster: keys are sharded over its nodes")
    pull: Literal["lazy", "whole"] = Field(
        "lazy", description="resuming a session from the server: lazy (blocks fetched when first read) or whole (copied first)"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not all(part.strip().startswith(("redis://", "rediss://", "unix://")) for part in value.split(",")):
            raise ValueError("must be empty or redis://, rediss:// or unix:// URLs (comma-separated: a cluster's nodes)")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(ch.isspace() for ch in value) or len(value) > 64:
            raise ValueError("must be 1-64 characters without spaces")
        return value

    @field_validator("timeout_s", "lease_s", mode="before")
    @classmethod
    def _seconds_type(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a number of seconds")
        return value

    @field_validator("timeout_s")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not 0.01 <= value <= 600:
            raise ValueError("must be between 0.01 and 600 seconds")
        return value

    @field_validator("lease_s")
    @classmethod
    def _lease(cls, value: float) -> float:
        if not 1 <= value <= 86400:
            raise ValueError("must be between 1 and 86400 seconds")
        return value


class Config(_Section):
    """The whole hkv configuration. Build it with :meth:`load`, :meth:`from_file` or the constructor."""

    tiers: TiersConfig = TiersConfig()
    attention: AttentionConfig = AttentionConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    store: StoreConfig = StoreConfig()
    remote: RemoteConfig = RemoteConfig()

    @model_validator(mode="after")
    def _prefixes_are_stored(self) -> Config:
        if self.remote.url and self.remote.prefixes and not self.store.persist:
            raise ValueError(
                "remote.prefixes = true pushes the blocks rt.generate stores, and with store.persist = false it stores "
                "none: set store.persist = true, or remote.prefixes = false"
            )
        return self

    @model_validator(mode="after")
    def _exact_is_lossless(self) -> Config:
        for key in ("disk_encoding", "host_encoding"):
            value = getattr(self.tiers, key)
            if self.attention.mode == "exact" and value != "none":
                raise ValueError(
                    f"tiers.{key} = {value!r} is lossy, and attention.mode = 'exact' must reproduce "
                    f"the model's own outputs: use tiers.{key} = 'none', or attention.mode = 'sparse'"
                )
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(_describe(error)) from None

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | dict[str, Any] | Config | None = None,
        *,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Config:
        """Build a config from a TOML path, a dict or a Config, then ``overrides``, then the environment.

        ``overrides`` are sections as keyword arguments, e.g. ``tiers={"host": "1GiB"}``.
        ``env`` defaults to ``os.environ``; only ``HKV_<SECTION>__<KEY>`` variables are read.
        """
        if source is None:
            data: dict[str, Any] = {}
        elif isinstance(source, Config):
            data = source.as_dict()
        elif isinstance(source, dict):
            data = _deep_copy(source)
        else:
            data = _read_toml(Path(source))
        _merge(data, overrides)
        _merge(data, env_overrides(os.environ if env is None else env))
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        return cls.load(path)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (byte sizes as ints, paths as strings), ready for TOML or JSON."""
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.as_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def env_overrides(environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    """``HKV_TIERS__HOST=8GiB`` -> ``{"tiers": {"host": "8GiB"}}``; values parse as TOML scalars when they can."""
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"environment variable {name}: expected {ENV_PREFIX}<SECTION>{ENV_DELIMITER}<KEY>")
        section, key = parts
        result.setdefault(section, {})[key] = _parse_scalar(raw)
    return result


def _parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {error}") from None


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = _deep_copy(value) if isinstance(value, dict) else value


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _describe(error: ValidationError) -> str:
    """One line per problem: ``tiers.host = -1: must be a positive byte size``."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "config"
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif item["type"] == "model_attributes_type" or item["type"] == "model_type":
            lines.append(f"{key} = {item.get('input')!r}: must be a table of keys")
        elif isinstance(item.get("input"), dict):  # a check across keys of a section
            lines.append(f"{key}: {message}")
        else:
            lines.append(f"{key} = {item.get('input')!r}: {message}")
    return "invalid hkv config:\n  " + "\n  ".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A JSON string is a TOML basic string (same escapes), but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
