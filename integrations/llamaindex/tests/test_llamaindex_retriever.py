"""BlockRAGRetriever over a knowledge base: nodes, excluded metadata, async, and the full query engine."""

from __future__ import annotations

import pytest
from llama_index.core.base.response.schema import StreamingResponse
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode
from llama_index.llms.blockrag import BlockRAGLLM, BlockSynthesizer
from llama_index.retrievers.blockrag import BlockRAGRetriever
from llamaindex_support import (
    no_network,  # noqa: F401
    record_events,
    sample_knowledge_base,
    stop_recording,
)

from blockrag.errors import InvalidInputError

QUESTION = "How long is Skelwith Tunnel?"


def test_nodes_carry_hits_and_keep_our_metadata_out_of_text():
    kb = sample_knowledge_base()
    nodes = BlockRAGRetriever(kb, similarity_top_k=3).retrieve(QUESTION)
    hits = kb.search(QUESTION, k=3)
    assert [n.node.node_id for n in nodes] == [h.passage_id for h in hits]
    assert [n.score for n in nodes] == pytest.approx([h.score for h in hits])
    for scored, hit in zip(nodes, hits):
        node = scored.node
        assert node.metadata["block_key"] == hit.block_key and node.metadata["title"] == hit.title
        assert node.metadata["chunk_index"] == hit.metadata["chunk_index"]  # the KB's own metadata passes through
        assert node.get_content(MetadataMode.LLM) == node.get_content(MetadataMode.EMBED) == hit.text


@pytest.mark.asyncio
async def test_aretrieve_and_events():
    retriever = BlockRAGRetriever(sample_knowledge_base(), similarity_top_k=2)
    log = record_events()
    try:
        nodes = await retriever.aretrieve(QUESTION)
    finally:
        stop_recording(log)
    assert len(nodes) == 2 and len(log.of(RetrievalEndEvent)) == 1
    with pytest.raises(InvalidInputError):
        BlockRAGRetriever(sample_knowledge_base(), similarity_top_k=0)


def test_query_engine_answers_from_the_knowledge_base_blocks():
    kb = sample_knowledge_base()
    llm = BlockRAGLLM(engine=kb.engine, max_new_tokens=8)
    engine = RetrieverQueryEngine(BlockRAGRetriever(kb, similarity_top_k=3), response_synthesizer=BlockSynthesizer(llm))
    log = record_events()
    try:
        response = engine.query(QUESTION)
    finally:
        stop_recording(log)
    usage = log.of(LLMCompletionEndEvent)[-1].response.raw["usage"]
    assert usage["encoded_tokens"] == 0  # every block was stored at ingest
    assert usage["cached_tokens"] == sum(n.node.metadata["token_count"] for n in response.source_nodes) + len(
        kb.engine.prefix_ids())
    assert response.response == kb.ask(QUESTION, k=3, max_new_tokens=8).text
    streaming = RetrieverQueryEngine(BlockRAGRetriever(kb, similarity_top_k=3),
                                     response_synthesizer=BlockSynthesizer(llm, streaming=True)).query(QUESTION)
    assert isinstance(streaming, StreamingResponse)
    assert "".join(streaming.response_gen) == response.response
