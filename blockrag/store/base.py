"""KVStore: where KVBlocks live between requests, addressed by their content key."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from blockrag.kv import KVBlock


class KVStore(ABC):
    """Content-addressed storage of KVBlocks.

    Contract: ``put`` of a key already present may be skipped (same key, same content); ``get`` never
    returns a partial block; a block returned by ``get`` is never mutated by the caller or the store.
    """

    @abstractmethod
    def get(self, key: str) -> KVBlock | None:
        """The block stored under key, or None if absent (or unusable and dropped)."""

    @abstractmethod
    def put(self, block: KVBlock) -> None:
        """Store block under block.key."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether get(key) would find a block (does not load it)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove key; True if something was removed."""

    def close(self) -> None:  # noqa: B027 - optional hook: most stores hold nothing to release
        """Release resources. The default holds none."""

    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        return [self.get(key) for key in keys]

    def put_many(self, blocks: Iterable[KVBlock]) -> None:
        for block in blocks:
            self.put(block)

    def __contains__(self, key: str) -> bool:
        return self.contains(key)

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
