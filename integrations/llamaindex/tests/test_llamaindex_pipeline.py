"""KV transform in an IngestionPipeline (incl. re-runs served from the pipeline cache) and the block-aware
synthesizer inside RetrieverQueryEngine, streaming and not, sync and async."""

from __future__ import annotations

import pytest
from llama_index.core import SummaryIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.ingestion import IngestionCache, IngestionPipeline
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import Document, MetadataMode, TextNode
from llama_index.llms.blockrag import BlockKVTransform, BlockRAGLLM, BlockSynthesizer
from llama_index.llms.blockrag._runtime import node_passage
from llamaindex_support import (
    no_network,  # noqa: F401
    record_events,
    stop_recording,
    tiny_engine,
)

from blockrag.errors import InvalidInputError

TEXTS = {
    "Reopening": "The Calder Fell line reopened to passengers in 1994 after a twelve-year restoration.",
    "Fuel": "Its two tank engines burn Welsh steam coal, about a tonne on a busy summer day.",
    "Depot": "The engine shed and carriage works stand at Harrowgill, the northern terminus.",
}


def _documents() -> list[Document]:
    return [Document(text=text, metadata={"title": title}, id_=title.lower()) for title, text in TEXTS.items()]


def test_transform_records_keys_and_is_idempotent():
    engine = tiny_engine()
    nodes = [TextNode(text=text, metadata={"title": title}) for title, text in TEXTS.items()]
    transform = BlockKVTransform(engine)
    transform(nodes)
    keys = [node.metadata["block_key"] for node in nodes]
    assert keys == [engine.key_of(engine.block_ids(node_passage(node))) for node in nodes]
    assert all(engine.store.contains(key) for key in keys)
    # our key stays out of what LLMs and embedders read
    assert all("block_key" not in node.get_content(MetadataMode.LLM) for node in nodes)
    assert all("block_key" not in node.get_content(MetadataMode.EMBED) for node in nodes)
    stored = len(engine.store)
    transform(nodes)
    assert len(engine.store) == stored and [n.metadata["block_key"] for n in nodes] == keys


def test_transform_cache_key_follows_the_model():
    same = BlockKVTransform(tiny_engine()).to_dict()
    assert same == BlockKVTransform(tiny_engine()).to_dict()
    assert same != BlockKVTransform(tiny_engine("qwen2")).to_dict()


def test_transform_skips_empty_nodes():
    engine = tiny_engine()
    nodes = BlockKVTransform(engine)([TextNode(text="   "), TextNode(text="Some text.")])
    assert "block_key" not in nodes[0].metadata and "block_key" in nodes[1].metadata


def _usage_of(run) -> dict:
    log = record_events()
    try:
        result = run()
    finally:
        stop_recording(log)
    return result, log.of(LLMCompletionEndEvent)[-1].response.raw["usage"]


def test_pipeline_cache_hit_skips_the_transform_and_answers_still_work():
    cache = IngestionCache()
    first_engine = tiny_engine()
    nodes = IngestionPipeline(transformations=[BlockKVTransform(first_engine)], cache=cache).run(
        documents=_documents())
    assert len(first_engine.store) == len(TEXTS)

    # A new process: same model, empty KV store, the pipeline cache persisted.
    engine = tiny_engine()
    cached_nodes = IngestionPipeline(transformations=[BlockKVTransform(engine)], cache=cache).run(
        documents=_documents())
    assert len(engine.store) == 0  # the transform was not called: its output came from the cache
    assert [n.metadata["block_key"] for n in cached_nodes] == [n.metadata["block_key"] for n in nodes]

    llm = BlockRAGLLM(engine=engine, max_new_tokens=8)
    query_engine = RetrieverQueryEngine(SummaryIndex(cached_nodes).as_retriever(),
                                        response_synthesizer=BlockSynthesizer(llm))
    first, usage = _usage_of(lambda: query_engine.query("Where is the engine shed?"))
    passage_tokens = sum(len(engine.block_ids(node_passage(n))) for n in cached_nodes)
    assert usage["encoded_tokens"] == passage_tokens + len(engine.prefix_ids())  # encoded from text on a miss
    second, usage = _usage_of(lambda: query_engine.query("Where is the engine shed?"))
    assert usage["encoded_tokens"] == 0 and usage["cached_tokens"] == passage_tokens + len(engine.prefix_ids())
    assert str(first) == str(second)

    # The same answer as with the engine that ran the transform.
    reference = RetrieverQueryEngine(SummaryIndex(nodes).as_retriever(),
                                     response_synthesizer=BlockSynthesizer(BlockRAGLLM(engine=first_engine,
                                                                                      max_new_tokens=8)))
    assert str(reference.query("Where is the engine shed?")) == str(first)


@pytest.fixture(scope="module")
def ingested():
    engine = tiny_engine()
    nodes = IngestionPipeline(transformations=[BlockKVTransform(engine)]).run(documents=_documents())
    return engine, nodes


def _query_engine(engine, nodes, streaming: bool, **kwargs) -> RetrieverQueryEngine:
    llm = BlockRAGLLM(engine=engine, max_new_tokens=10)
    return RetrieverQueryEngine(SummaryIndex(nodes).as_retriever(),
                                response_synthesizer=BlockSynthesizer(llm, streaming=streaming, **kwargs))


def test_query_engine_each_node_is_one_cached_block(ingested):
    engine, nodes = ingested
    response, usage = _usage_of(lambda: _query_engine(engine, nodes, False).query("Where is the engine shed?"))
    assert isinstance(response, Response) and response.response
    assert [n.node.node_id for n in response.source_nodes] == [n.node_id for n in nodes]
    assert usage["cached_tokens"] >= sum(len(engine.block_ids(node_passage(n))) for n in nodes)
    # the question alone is prefilled: the same as asking the LLM with the passages directly
    direct = BlockRAGLLM(engine=engine, max_new_tokens=10).complete(
        "Where is the engine shed?", passages=[node_passage(n) for n in nodes])
    assert response.response == direct.text
    assert usage["prefilled_tokens"] == direct.raw["usage"]["prefilled_tokens"]


def test_query_engine_streaming_matches(ingested):
    engine, nodes = ingested
    expected = _query_engine(engine, nodes, False).query("Who burns Welsh coal?").response
    response = _query_engine(engine, nodes, True).query("Who burns Welsh coal?")
    assert isinstance(response, StreamingResponse)
    assert "".join(response.response_gen) == expected
    assert len(response.source_nodes) == len(nodes)


@pytest.mark.asyncio
async def test_query_engine_async_with_and_without_streaming(ingested):
    engine, nodes = ingested
    expected = _query_engine(engine, nodes, False).query("Who burns Welsh coal?").response
    response = await _query_engine(engine, nodes, False).aquery("Who burns Welsh coal?")
    assert response.response == expected
    streaming = await _query_engine(engine, nodes, True).aquery("Who burns Welsh coal?")
    assert isinstance(streaming, AsyncStreamingResponse)
    assert "".join([delta async for delta in streaming.async_response_gen()]) == expected


def test_synthesizer_callback_events_and_instruction(ingested):
    engine, nodes = ingested
    debug = LlamaDebugHandler()
    query_engine = _query_engine(engine, nodes, False, callback_manager=CallbackManager([debug]),
                                 instruction="Answer in one sentence.")
    response = query_engine.query("Where is the engine shed?")
    assert len(debug.get_event_pairs(CBEventType.SYNTHESIZE)) == 1
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 1
    direct = BlockRAGLLM(engine=engine, max_new_tokens=10).complete(
        "Where is the engine shed?", passages=[node_passage(n) for n in nodes], instruction="Answer in one sentence.")
    assert response.response == direct.text


def test_synthesizer_stock_text_chunks_and_empty(ingested):
    engine, _ = ingested
    synthesizer = BlockSynthesizer(BlockRAGLLM(engine=engine, max_new_tokens=6), empty_response="nothing found")
    assert synthesizer.get_response("Where?", ["The shed is at Harrowgill."])
    assert str(synthesizer.synthesize("Where?", [])) == "nothing found"


def test_synthesizer_refuses_another_llm():
    with pytest.raises(InvalidInputError, match="BlockRAGLLM"):
        BlockSynthesizer(llm="not an llm")
