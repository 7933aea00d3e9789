"""The README's guidance for LlamaIndex, measured: a stock query engine (`index.as_query_engine(llm=BlockRAGLLM(...))`)
writes the retrieved nodes into one prompt string, so at most block 0 is read from cache and the whole context
is prefilled on every query; `RetrieverQueryEngine(retriever, response_synthesizer=BlockSynthesizer(llm))` over
the same retriever serves every node from its cached block."""

from __future__ import annotations

import pytest
from llama_index.core import MockEmbedding, VectorStoreIndex
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import TextNode
from llama_index.llms.blockrag import BlockRAGLLM, BlockSynthesizer
from llama_index.llms.blockrag._runtime import node_passage
from llamaindex_support import no_network, record_events, stop_recording, tiny_engine  # noqa: F401

NODES = [TextNode(text="The Calder Fell line reopened to passengers in 1994.", metadata={"title": "Reopening"}),
         TextNode(text="Skelwith Tunnel is 212 metres long.", metadata={"title": "Tunnel"}),
         TextNode(text="Harrowgill station has two platforms and a footbridge.", metadata={"title": "Harrowgill"})]
QUESTION = "When did the line reopen?"


def index() -> VectorStoreIndex:
    return VectorStoreIndex(NODES, embed_model=MockEmbedding(embed_dim=8))  # offline; top 3 of 3 is every node


def completion_usages(query_engine) -> list[dict]:
    """The engine's usage of every LLM completion one query makes."""
    log = record_events()
    try:
        query_engine.query(QUESTION)
    finally:
        stop_recording(log)
    return [event.response.raw["usage"] for event in log.of(LLMCompletionEndEvent)]


def node_tokens(engine) -> int:
    return sum(len(engine.block_ids(node_passage(node))) for node in NODES)


@pytest.mark.parametrize("response_mode", ["compact", "refine", "tree_summarize"])
def test_a_stock_query_engine_caches_at_most_block_0(response_mode):
    engine = tiny_engine()
    query_engine = index().as_query_engine(llm=BlockRAGLLM(engine=engine, max_new_tokens=6), similarity_top_k=3,
                                           response_mode=response_mode)
    completion_usages(query_engine)
    again = completion_usages(query_engine)  # the same query: whatever could be cached is cached now
    assert again, "the stock synthesizer made no LLM call"
    for usage in again:
        assert usage["cached_tokens"] <= len(engine.prefix_ids()) and usage["encoded_tokens"] == 0
    # the nodes are in the prompt string (the final block), prefilled on every query
    assert sum(usage["prefilled_tokens"] for usage in again) > node_tokens(engine)


def test_block_synthesizer_reads_every_node_from_its_cached_block():
    engine = tiny_engine()
    retriever = index().as_retriever(similarity_top_k=3)  # the stock engine's retriever: only the synthesizer differs
    query_engine = RetrieverQueryEngine(retriever, response_synthesizer=BlockSynthesizer(
        BlockRAGLLM(engine=engine, max_new_tokens=6)))
    context = len(engine.prefix_ids()) + node_tokens(engine)
    (first,) = completion_usages(query_engine)
    assert first["cached_tokens"] == 0 and first["encoded_tokens"] == context  # a fresh store: encoded once
    (second,) = completion_usages(query_engine)
    assert second["cached_tokens"] == context and second["encoded_tokens"] == 0
    assert second["prefilled_tokens"] == len(engine.final_ids(QUESTION))  # only the question is prefilled

    stock = index().as_query_engine(llm=BlockRAGLLM(engine=tiny_engine(), max_new_tokens=6), similarity_top_k=3)
    completion_usages(stock)
    (stock_second,) = completion_usages(stock)  # compact: the three short nodes fit in one call
    assert stock_second["cached_tokens"] < second["cached_tokens"]
    assert stock_second["prefilled_tokens"] > second["prefilled_tokens"] + node_tokens(engine)
