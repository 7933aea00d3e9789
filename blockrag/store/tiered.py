"""TieredKVStore: a fast front store (memory, possibly on the GPU) in front of a durable back store (disk)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from blockrag.kv import KVBlock
from blockrag.store.base import KVStore
from blockrag.store.errors import StoreWriteError

logger = logging.getLogger("blockrag.store")


class TieredKVStore(KVStore):
    """Reads hit the front first; a back hit is promoted into the front. Writes go through to both.

    Args:
        front: the fast tier (e.g. MemoryKVStore); may evict at will.
        back: the durable tier (e.g. DiskKVStore); the source of truth.
        tolerate_write_errors: if the back tier cannot write (disk full), keep the block in the front
            tier and log a warning instead of raising. Meant for serving, where an answer matters more
            than caching; ingest should see the error.
    """

    def __init__(self, front: KVStore, back: KVStore, *, tolerate_write_errors: bool = False) -> None:
        self.front = front
        self.back = back
        self.tolerate_write_errors = tolerate_write_errors

    def __repr__(self) -> str:
        return f"TieredKVStore(front={self.front!r}, back={self.back!r})"

    def get(self, key: str) -> KVBlock | None:
        block = self.front.get(key)
        if block is not None:
            return block
        block = self.back.get(key)
        if block is not None:
            self.front.put(block)
        return block

    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        return [self.get(key) for key in keys]

    def put(self, block: KVBlock) -> None:
        try:
            self.back.put(block)
        except StoreWriteError as e:
            if not self.tolerate_write_errors:
                raise
            logger.warning("block %s kept in memory only: %s", block.key[:12], e)
        self.front.put(block)

    def contains(self, key: str) -> bool:
        return self.front.contains(key) or self.back.contains(key)

    def delete(self, key: str) -> bool:
        in_front = self.front.delete(key)
        in_back = self.back.delete(key)
        return in_front or in_back

    def close(self) -> None:
        self.front.close()
        self.back.close()
