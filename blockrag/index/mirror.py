"""The in-memory vector index of a knowledge base, kept in line with the docstore (its source of truth)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from blockrag.index.docstore import Docstore
from blockrag.index.vectors import VectorIndex

logger = logging.getLogger("blockrag.index")


class IndexMirror:
    """A VectorIndex loaded from ``file`` (or rebuilt from the docstore) and patched when the docstore moves on.

    The docstore's version counter tells when another process (or a stale index file) left it behind.
    """

    def __init__(self, file: Path, kind: str, dim: int, docstore: Docstore, tmp_dir: Path) -> None:
        self.file, self.kind, self.dim = file, kind, dim
        self.docstore = docstore
        self.tmp_dir = tmp_dir
        self.lock = threading.RLock()
        self._index = self._load()
        self._version = -1
        self.sync()

    def _load(self) -> VectorIndex:
        if self.file.exists():
            try:
                index = VectorIndex.load(self.file, self.kind)
                if index.dim == self.dim:
                    return index
                logger.warning("vector index %s has dimension %d, expected %d; rebuilding it", self.file,
                               index.dim, self.dim)
            except ValueError as e:
                logger.warning("%s; rebuilding the vector index from the docstore", e)
        return VectorIndex(self.dim, self.kind)

    def saved_ids(self) -> set[int]:
        """Ids in the saved index file (empty if there is none or it is unreadable)."""
        if not self.file.exists():
            return set()
        try:
            return VectorIndex.load(self.file, self.kind).ids()
        except ValueError:
            return set()

    def __len__(self) -> int:
        with self.lock:
            return len(self._index)

    def sync(self) -> None:
        """Bring the in-memory index in line with the docstore (other processes, or a stale index file)."""
        version = self.docstore.version()
        if version == self._version:
            return
        with self.lock:
            in_db = self.docstore.vec_ids()
            have = self._index.ids()
            extra, missing = have - in_db, in_db - have
            if extra and not self._index.supports_remove:
                self.rebuild()
            else:
                if extra:
                    self._index.remove(extra)
                if missing:
                    ids, vectors = self.docstore.embeddings(missing)
                    self._index.add(ids, vectors)
            self._version = version

    def rebuild(self) -> None:
        with self.lock:
            fresh = VectorIndex(self.dim, self.kind)
            ids, vectors = self.docstore.embeddings()
            if len(ids):
                fresh.add(ids, vectors)
            self._index = fresh

    def add(self, ids: Iterable[int], vectors: np.ndarray) -> None:
        with self.lock:
            self._index.add(np.asarray(list(ids), dtype=np.int64), vectors)

    def remove(self, vec_ids: list[int]) -> None:
        if not vec_ids:
            return
        with self.lock:
            if self._index.supports_remove:
                self._index.remove(vec_ids)
            else:
                self.rebuild()

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self._index.search(vector, k)

    def save(self) -> None:
        with self.lock:
            self._index.save(self.file, tmp_dir=self.tmp_dir)
