"""LlamaIndex components for blockrag: passages served from cached KV blocks (Block-Attention)."""

from llama_index.llms.blockrag.base import BlockRAGLLM
from llama_index.llms.blockrag.synthesizer import BlockSynthesizer
from llama_index.llms.blockrag.transform import BlockKVTransform

__all__ = ["BlockKVTransform", "BlockRAGLLM", "BlockSynthesizer"]
