"""LlamaIndex retriever over a blockrag knowledge base."""

from llama_index.retrievers.blockrag.base import BlockRAGRetriever, hit_node

__all__ = ["BlockRAGRetriever", "hit_node"]
