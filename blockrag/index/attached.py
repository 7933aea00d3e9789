"""The knowledge base's KV store as an engine sees it while attached: only blocks its docstore needs go in.

An engine writes what it encodes, and what it reads from one attached store, through to every attached store
(``blockrag.blocks.BlockSource``). The engine cannot tell whose block is whose, and that is correct: blocks
are keyed by content. Whose directory a block belongs in is something only the knowledge base knows, so the
knowledge base answers it here. Without this view, two knowledge bases on one engine would copy each other's
blocks (and blocks of passages given to the engine directly) into their directories, where ``gc`` deletes
them as orphans. And a delete through the engine's store would remove a block from every knowledge base,
including one that still needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

from blockrag.index.docstore import Docstore
from blockrag.kv import KVBlock
from blockrag.store.base import KVStore
from blockrag.store.disk import DiskKVStore


class AttachedKVStore(KVStore):
    """``kv`` for an engine: reads as they are; ``put`` keeps only blocks ``docstore`` needs; ``delete`` never.

    Args:
        kv: the knowledge base's own disk store (ingest, gc and verify use it directly).
        docstore: what decides which blocks are needed (``BlockCensus.needed``, one key at a time).
    """

    def __init__(self, kv: DiskKVStore, docstore: Docstore) -> None:
        self.kv = kv
        self.docstore = docstore

    def __repr__(self) -> str:
        return f"AttachedKVStore({self.kv!r})"

    def get(self, key: str) -> KVBlock | None:
        return self.kv.get(key)

    def get_many(self, keys: Sequence[str]) -> list[KVBlock | None]:
        return self.kv.get_many(keys)

    def contains(self, key: str) -> bool:
        return self.kv.contains(key)

    def put(self, block: KVBlock) -> None:
        """Store ``block`` if a passage of this knowledge base (for any of its models) or a model's instruction
        block has its key; otherwise skip it (it belongs to another knowledge base or to no one)."""
        if self.docstore.needs(block.key):
            self.kv.put(block)

    def delete(self, key: str) -> bool:
        """Delete nothing: the knowledge base deletes its own files, under its writer lock.

        NOTE: a file no passage references yet may be one an ingest (in this or another process) has just
        written and is about to commit; only the writer lock tells these apart from real orphans.
        """
        return False

    def close(self) -> None:
        """Nothing: the knowledge base closes ``kv`` (the engine only borrows it)."""
