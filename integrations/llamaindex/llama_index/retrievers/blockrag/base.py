"""BlockRAGRetriever: a LlamaIndex retriever over a blockrag `KnowledgeBase`.

Each hit becomes a `TextNode` (id = passage id) whose metadata carries the block key, source, title,
token count and ids. Those keys (and the knowledge base's chunk offsets) are excluded from the text LLMs
and embedders see, so a node's content is the passage text the knowledge base encoded plus only the
document's own metadata.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.llms.blockrag._runtime import BLOCK_KEY

from blockrag.errors import InvalidInputError
from blockrag.index import KnowledgeBase, SearchHit

METADATA_KEYS = (BLOCK_KEY, "source", "title", "token_count", "doc_id", "passage_id")
# NOTE: the knowledge base adds these to every passage's metadata; they are bookkeeping, not content.
KB_METADATA_KEYS = ("chunk_index", "char_start", "char_end")


def hit_node(hit: SearchHit) -> NodeWithScore:
    """A search hit as a scored LlamaIndex node."""
    metadata: dict[str, Any] = dict(hit.metadata or {})
    metadata.update({BLOCK_KEY: hit.block_key, "source": hit.source, "title": hit.title,
                     "token_count": int(hit.token_count), "doc_id": hit.doc_id, "passage_id": hit.passage_id})
    hidden = [*METADATA_KEYS, *KB_METADATA_KEYS]
    node = TextNode(id_=hit.passage_id, text=hit.text, metadata=metadata,
                    excluded_llm_metadata_keys=list(hidden), excluded_embed_metadata_keys=list(hidden))
    return NodeWithScore(node=node, score=float(hit.score))


class BlockRAGRetriever(BaseRetriever):
    """Top-k passages of a knowledge base.

    Args:
        knowledge_base: the knowledge base to search (answer with `BlockRAGLLM(engine=kb.engine)` for cache hits).
        similarity_top_k: number of passages to return.
    """

    def __init__(self, knowledge_base: KnowledgeBase, similarity_top_k: int = 4,
                 callback_manager: CallbackManager | None = None, **kwargs: Any) -> None:
        if not isinstance(similarity_top_k, int) or similarity_top_k < 1:
            raise InvalidInputError(f"expected similarity_top_k to be a positive integer, found {similarity_top_k!r}")
        self._knowledge_base = knowledge_base
        self.similarity_top_k = similarity_top_k
        super().__init__(callback_manager=callback_manager, **kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [hit_node(hit) for hit in self._knowledge_base.search(query_bundle.query_str, k=self.similarity_top_k)]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)
