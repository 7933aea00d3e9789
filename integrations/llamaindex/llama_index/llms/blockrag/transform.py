"""BlockKVTransform: an IngestionPipeline step that precomputes each node's KV block.

Content-addressed and idempotent: a node's block key is a hash of the model fingerprint, the template
version and the node's passage token ids, and encoding a key the store already holds is a lookup.
The pipeline caches a transform's output by its input nodes and `to_dict()`; on a cache hit this
transform is not called at all, so its side effect (KV in the engine's store) may be missing later.
That is harmless by construction: the synthesizer uses a stored block when the key is present and
otherwise passes the node's text, which the engine encodes (and stores) under the same key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent
from llama_index.llms.blockrag._runtime import BLOCK_KEY, node_passage

from blockrag import BlockEngine


def exclude_from_text(node: BaseNode, keys: Sequence[str]) -> None:
    """Keep metadata keys out of the node text that LLMs and embedders see."""
    for key in keys:
        if key not in node.excluded_llm_metadata_keys:
            node.excluded_llm_metadata_keys.append(key)
        if key not in node.excluded_embed_metadata_keys:
            node.excluded_embed_metadata_keys.append(key)


class BlockKVTransform(TransformComponent):
    """Encode every node's passage block once and record its content key in `metadata["block_key"]`.

    Example:
        ```python
        pipeline = IngestionPipeline(transformations=[SentenceSplitter(), BlockKVTransform(engine)])
        nodes = pipeline.run(documents=documents)
        ```
    """

    fingerprint: str = Field(description="Model fingerprint of the engine; part of the pipeline cache key.")
    template_version: str = Field(description="Block template version; part of the pipeline cache key.")
    batch_size: int = Field(default=16, gt=0, description="Nodes encoded per engine call.")

    _engine: BlockEngine = PrivateAttr()

    def __init__(self, engine: BlockEngine, **kwargs: Any) -> None:
        super().__init__(fingerprint=engine.fingerprint, template_version=engine.template.version, **kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "BlockKVTransform"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        todo = [(node, node_passage(node)) for node in nodes]
        todo = [(node, passage) for node, passage in todo if passage.text.strip()]  # the engine refuses empties
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for (node, _), block in zip(batch, self._engine.encode([passage for _, passage in batch])):
                node.metadata[BLOCK_KEY] = block.key
                exclude_from_text(node, [BLOCK_KEY])
        return nodes
