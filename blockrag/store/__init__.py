"""KV stores: where encoded blocks live between requests.

``create_store(url)`` builds one from a URL: ``memory://``, ``disk:///path``, ``tiered:///path``.
"""

from blockrag.fp8 import dequantize_fp8, quantize_fp8
from blockrag.store.base import KVStore
from blockrag.store.disk import DiskKVStore
from blockrag.store.errors import CorruptBlockError, StoreError, StoreURLError, StoreWriteError
from blockrag.store.factory import create_store
from blockrag.store.memory import MemoryKVStore
from blockrag.store.tiered import TieredKVStore

__all__ = [
    "CorruptBlockError",
    "DiskKVStore",
    "KVStore",
    "MemoryKVStore",
    "StoreError",
    "StoreURLError",
    "StoreWriteError",
    "TieredKVStore",
    "create_store",
    "dequantize_fp8",
    "quantize_fp8",
]
