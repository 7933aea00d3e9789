"""Retriever documents and the LCEL chain: metadata, k handling, and answers served from the KB's blocks."""

from __future__ import annotations

import json

import pytest
from langchain_blockrag import BlockRAGRetriever, ChatBlockRAG, create_rag_chain
from langchain_core.messages import AIMessageChunk
from langchain_support import (
    no_network,  # noqa: F401
    sample_knowledge_base,
)

from blockrag import Passage
from blockrag.errors import InvalidInputError

QUESTION = "How long is Skelwith Tunnel?"


def test_documents_carry_json_safe_metadata():
    kb = sample_knowledge_base()
    docs = BlockRAGRetriever(knowledge_base=kb, k=3).invoke(QUESTION)
    hits = kb.search(QUESTION, k=3)
    assert [d.id for d in docs] == [h.passage_id for h in hits]
    assert docs[0].metadata["title"] == "Skelwith Tunnel"
    for doc, hit in zip(docs, hits):
        assert doc.page_content == hit.text
        assert doc.metadata["block_key"] == hit.block_key and doc.metadata["source"] == hit.source
        assert doc.metadata["token_count"] == hit.token_count and doc.metadata["score"] == pytest.approx(hit.score)
        json.dumps(doc.metadata)


@pytest.mark.asyncio
async def test_k_call_kwarg_sync_and_async():
    retriever = BlockRAGRetriever(knowledge_base=sample_knowledge_base(), k=4)
    assert len(retriever.invoke(QUESTION)) == 4
    assert len(retriever.invoke(QUESTION, k=1)) == 1
    assert len(await retriever.ainvoke(QUESTION, k=2)) == 2
    with pytest.raises(InvalidInputError):
        retriever.invoke(QUESTION, k=0)


def test_chain_answers_from_the_knowledge_base_blocks():
    kb = sample_knowledge_base()
    chain = create_rag_chain(BlockRAGRetriever(knowledge_base=kb, k=3), ChatBlockRAG(engine=kb.engine, max_tokens=8))
    result = chain.invoke(QUESTION)
    assert set(result) == {"question", "sources", "message", "answer"}
    assert result["question"] == QUESTION and len(result["sources"]) == 3
    assert result["answer"] == result["message"].text
    usage = result["message"].usage_metadata
    # every passage block and the instruction block were stored at ingest: nothing is encoded now
    context = sum(doc.metadata["token_count"] for doc in result["sources"]) + len(kb.engine.prefix_ids())
    assert usage["input_token_details"] == {"cache_read": context, "cache_creation": 0}
    # the chain's answer is the knowledge base's own answer to the same question
    direct = kb.ask(QUESTION, k=3, max_new_tokens=8)
    assert result["answer"] == direct.text
    assert [Passage(d.page_content, d.metadata["title"]) for d in result["sources"]] == [
        Passage(h.text, h.title) for h in direct.sources]


def test_chain_streams_message_chunks():
    kb = sample_knowledge_base()
    chain = create_rag_chain(BlockRAGRetriever(knowledge_base=kb, k=2), ChatBlockRAG(engine=kb.engine, max_tokens=8),
                             instruction="Answer from the passages only.")
    parts = list(chain.stream(QUESTION))
    chunks = [p["message"] for p in parts if "message" in p]
    assert len(chunks) > 1 and all(isinstance(c, AIMessageChunk) for c in chunks)
    answer = [p["answer"] for p in parts if "answer" in p]
    assert answer == ["".join(c.text for c in chunks)]
    assert kb.ask(QUESTION, k=2, max_new_tokens=8, instruction="Answer from the passages only.").text == answer[0]
