"""KV stores: where encoded blocks live between requests."""

from blockrag.store.base import KVStore
from blockrag.store.memory import MemoryKVStore

__all__ = ["KVStore", "MemoryKVStore"]
