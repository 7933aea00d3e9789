"""BlockRAGRetriever: a LangChain retriever over a blockrag `KnowledgeBase`.

Each hit becomes a `Document` whose metadata carries what `ChatBlockRAG` needs to serve it from cache
(`block_key`) and what a user needs to cite it (`source`, `title`, `score`, `token_count`, ids), all
JSON-safe.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field

from blockrag.errors import InvalidInputError
from blockrag.index import KnowledgeBase, SearchHit
from langchain_blockrag._runtime import BLOCK_KEY


def hit_document(hit: SearchHit) -> Document:
    """A search hit as a LangChain `Document` (id = passage id)."""
    metadata: dict[str, Any] = dict(hit.metadata or {})
    metadata.update({
        BLOCK_KEY: hit.block_key,
        "source": hit.source,
        "title": hit.title,
        "score": float(hit.score),
        "token_count": int(hit.token_count),
        "doc_id": hit.doc_id,
        "passage_id": hit.passage_id,
    })
    return Document(page_content=hit.text, metadata=metadata, id=hit.passage_id)


class BlockRAGRetriever(BaseRetriever):
    """Top-k passages of a knowledge base; `k` is a field and a call kwarg.

    Example:
        ```python
        retriever = BlockRAGRetriever(knowledge_base=kb, k=4)
        retriever.invoke("When did the line reopen?", k=2)
        ```
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    knowledge_base: KnowledgeBase = Field(exclude=True)
    """The knowledge base to search (its engine is the one to answer with, for cache hits)."""
    k: int = Field(default=4, gt=0)
    """Number of passages to return."""

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        k = self.k if k is None else k
        if not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"expected k to be a positive integer, found {k!r}")
        return [hit_document(hit) for hit in self.knowledge_base.search(query, k=k)]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None) -> list[Document]:
        # NOTE: overridden because the default async path does not forward call kwargs such as k.
        return await run_in_executor(None, self._get_relevant_documents, query,
                                     run_manager=run_manager.get_sync(), k=k)
