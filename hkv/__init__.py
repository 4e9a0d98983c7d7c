"""hkv: a tiered, attention-guided KV cache for million-token contexts on ordinary hardware."""

from .blocks import BlockKey, BlockLayout
from .config import Config, ConfigError

__all__ = ["BlockKey", "BlockLayout", "Config", "ConfigError"]
__version__ = "0.1.0"
