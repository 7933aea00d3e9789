"""MemoryKVStore: an LRU of KVBlocks bounded by bytes, on any torch device."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from blockrag.kv import KVBlock
from blockrag.store.base import KVStore


class MemoryKVStore(KVStore):
    """Keeps blocks in memory (optionally moved to ``device``); evicts least recently used past max_bytes."""

    def __init__(self, max_bytes: int = 2 << 30, device: torch.device | str | None = None) -> None:
        self.max_bytes = max_bytes
        self.device = torch.device(device) if device is not None else None
        self._blocks: OrderedDict[str, KVBlock] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: str) -> KVBlock | None:
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
            return block

    def put(self, block: KVBlock) -> None:
        if block.nbytes > self.max_bytes:
            return  # NOTE: a block larger than the whole budget would evict everything and still not fit.
        if self.device is not None and block.device != self.device:
            block = block.to(self.device)
        with self._lock:
            old = self._blocks.pop(block.key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._blocks[block.key] = block
            self._bytes += block.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._blocks.popitem(last=False)
                self._bytes -= evicted.nbytes

    def contains(self, key: str) -> bool:
        return key in self._blocks

    def delete(self, key: str) -> bool:
        with self._lock:
            block = self._blocks.pop(key, None)
            if block is None:
                return False
            self._bytes -= block.nbytes
            return True
