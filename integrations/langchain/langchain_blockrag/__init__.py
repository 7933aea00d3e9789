"""LangChain components for blockrag: passages served from cached KV blocks (Block-Attention)."""

from langchain_blockrag.chains import create_rag_chain, document_block, rag_messages
from langchain_blockrag.chat_models import ChatBlockRAG
from langchain_blockrag.retrievers import BlockRAGRetriever

__all__ = [
    "BlockRAGRetriever",
    "ChatBlockRAG",
    "create_rag_chain",
    "document_block",
    "rag_messages",
]
