"""blockrag: Block-Attention for retrieval-augmented generation.

Passages are encoded once, alone, and their KV cached; at question time the cached blocks are
concatenated with their keys rotated to their new positions, and only the question is prefilled.
"""

from blockrag.engine import BlockEngine, BlockInfo, Generation, GenerationStream, PrefillResult, Usage
from blockrag.errors import (
    BlockRAGError,
    InvalidInputError,
    KVBlockMismatchError,
    PromptTooLongError,
    UnsupportedModelError,
)
from blockrag.kv import KVBlock, block_key, model_fingerprint
from blockrag.template import BlockTemplate, Passage

__version__ = "0.1.0"

__all__ = [
    "BlockEngine",
    "BlockInfo",
    "BlockRAGError",
    "BlockTemplate",
    "Generation",
    "GenerationStream",
    "InvalidInputError",
    "KVBlock",
    "KVBlockMismatchError",
    "Passage",
    "PrefillResult",
    "PromptTooLongError",
    "UnsupportedModelError",
    "Usage",
    "block_key",
    "model_fingerprint",
]
