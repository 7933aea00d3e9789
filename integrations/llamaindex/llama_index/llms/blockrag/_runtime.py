"""Retrieved nodes turned into engine inputs, shared by the LlamaIndex components.

Engines named by `model_name=` are shared per process through `BlockEngine.shared`; streams are iterated
asynchronously through `blockrag.aio.iterate_in_thread`.
"""

from __future__ import annotations

from llama_index.core.schema import BaseNode, MetadataMode

from blockrag import BlockEngine, KVBlock, Passage

BLOCK_KEY = "block_key"
"""Node metadata key that carries the content key of a passage's cached KV block."""


def node_passage(node: BaseNode) -> Passage:
    """The passage a node stands for: its bare content (no metadata) and its `title` metadata, if any.

    The KV transform and the synthesizer both render nodes through this one function, so a node's
    block key is the same at ingest and at question time.
    """
    title = node.metadata.get("title")
    return Passage(text=node.get_content(metadata_mode=MetadataMode.NONE), title=str(title) if title else None)


def node_input(engine: BlockEngine, node: BaseNode) -> Passage | KVBlock:
    """A node as engine input: its cached block by key when the store has it, else its passage."""
    passage = node_passage(node)
    return engine.passage_or_block(passage.text, passage.title, node.metadata.get(BLOCK_KEY))
