"""Knowledge base: documents -> passages -> KV blocks (disk) + embeddings (FAISS) + rows (SQLite) -> answers.

    from blockrag.index import KnowledgeBase, Document
    with KnowledgeBase.create("kb/", engine) as kb:
        kb.add_documents([Document("Paris is the capital of France.", title="Paris")])
        answer = kb.ask("What is the capital of France?")
"""

from blockrag.index.chunker import Chunk, chunk_text
from blockrag.index.documents import Document, load_file, load_paths
from blockrag.index.embedder import DEFAULT_EMBEDDER, Embedder
from blockrag.index.errors import (
    DocumentError,
    EmbedderMismatchError,
    EmptyKnowledgeBaseError,
    KnowledgeBaseError,
    KnowledgeBaseLockedError,
    NotAKnowledgeBaseError,
)
from blockrag.index.kb import Answer, IngestReport, KnowledgeBase, SearchHit
from blockrag.index.vectors import VectorIndex

__all__ = [
    "DEFAULT_EMBEDDER",
    "Answer",
    "Chunk",
    "Document",
    "DocumentError",
    "EmbedderMismatchError",
    "Embedder",
    "EmptyKnowledgeBaseError",
    "IngestReport",
    "KnowledgeBase",
    "KnowledgeBaseError",
    "KnowledgeBaseLockedError",
    "NotAKnowledgeBaseError",
    "SearchHit",
    "VectorIndex",
    "chunk_text",
    "load_file",
    "load_paths",
]
