"""VectorIndex: FAISS inner-product search over normalised embeddings, addressed by int64 ids.

``flat`` (default): ``IndexIDMap2(IndexFlatIP)``, exact. ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)`` for large
corpora (approximate; removal is not supported by FAISS HNSW, so the knowledge base rebuilds it instead).
Persisted with FAISS's own serialisation, written atomically. Not thread-safe: the owner serialises calls.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from blockrag.atomic import atomic_write
from blockrag.errors import InvalidInputError

KINDS = ("flat", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError("the vector index needs FAISS: pip install faiss-cpu") from e
    return faiss


class VectorIndex:
    """Ids -> unit vectors, searched by inner product.

    Args:
        dim: vector dimension.
        kind: "flat" (exact) or "hnsw" (approximate, for large corpora).
        hnsw_m: HNSW graph degree.
    """

    def __init__(self, dim: int, kind: str = "flat", hnsw_m: int = 32, _index=None) -> None:
        if kind not in KINDS:
            raise InvalidInputError(f"expected index kind in {KINDS}, found {kind!r}")
        faiss = _faiss()
        self.dim, self.kind, self.hnsw_m = dim, kind, hnsw_m
        if _index is None:
            if kind == "flat":
                inner = faiss.IndexFlatIP(dim)
            else:
                inner = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                inner.hnsw.efSearch = 64
            _index = faiss.IndexIDMap2(inner)
        self._index = _index
        self._ids: set[int] = set(int(i) for i in faiss.vector_to_array(_index.id_map)) if _index.ntotal else set()

    def __len__(self) -> int:
        return self._index.ntotal

    @property
    def supports_remove(self) -> bool:
        return self.kind == "flat"

    def ids(self) -> set[int]:
        return set(self._ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Add vectors (N, dim) under ids (N,); ids already present are skipped. Returns how many were added."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        assert len(ids) == len(vectors), "one id per vector"
        keep = np.array([int(i) not in self._ids for i in ids], dtype=bool)
        if not keep.any():
            return 0
        ids, vectors = ids[keep], vectors[keep]
        self._index.add_with_ids(vectors, ids)
        self._ids.update(int(i) for i in ids)
        return len(ids)

    def remove(self, ids) -> int:
        """Remove ids (absent ones ignored). Only for kind "flat"."""
        if not self.supports_remove:
            raise NotImplementedError("FAISS HNSW indexes cannot remove vectors; rebuild the index instead")
        present = np.array(sorted(int(i) for i in ids if int(i) in self._ids), dtype=np.int64)
        if len(present) == 0:
            return 0
        removed = self._index.remove_ids(present)
        self._ids.difference_update(int(i) for i in present)
        return int(removed)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one (dim,) query, best first; at most len(self) results."""
        k = min(k, len(self))
        if k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores, ids = self._index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim), k)
        valid = ids[0] >= 0
        return scores[0][valid], ids[0][valid]

    def save(self, path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None) -> None:
        """Write the index atomically in FAISS's own format."""
        data = _faiss().serialize_index(self._index)
        atomic_write(path, memoryview(data), tmp_dir=tmp_dir)

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str) -> VectorIndex:
        """Read an index written by ``save``.

        Raises:
            ValueError: the file is not a FAISS index of the expected kind.
        """
        faiss = _faiss()
        data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        try:
            index = faiss.deserialize_index(data)
        except RuntimeError as e:
            raise ValueError(f"expected a FAISS index in {path}, found unreadable data: {str(e)[:200]}") from None
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"expected a FAISS IndexIDMap2 in {path}, found {type(index).__name__}")
        inner = faiss.downcast_index(index.index)
        expected = faiss.IndexFlatIP if kind == "flat" else faiss.IndexHNSWFlat
        if not isinstance(inner, expected):
            raise ValueError(f"expected a {kind} index in {path}, found {type(inner).__name__}")
        hnsw_m = inner.hnsw.nb_neighbors(1) if kind == "hnsw" else 32
        return cls(index.d, kind, hnsw_m, _index=index)
