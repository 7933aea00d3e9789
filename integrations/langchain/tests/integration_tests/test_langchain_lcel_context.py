"""A stock LCEL RAG chain (ChatPromptTemplate with `{context}` from `format_docs`) served from cached blocks
by opting in to `context_separator`, without rewriting the chain."""

from __future__ import annotations

import pytest
from langchain_blockrag import ChatBlockRAG
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_support import fresh_engine, no_network  # noqa: F401

from blockrag import Passage
from blockrag.errors import InvalidInputError

DOCS = [Document("The Calder Fell line reopened to Harrowgill in 1994."),
        Document("Skelwith Tunnel is 212 metres long."),
        Document("Harrowgill station has two platforms and a footbridge.")]
PREAMBLE = "Answer the question based only on the following context:"
TEMPLATE = PREAMBLE + "\n\n{context}\n\nQuestion: {question}"
QUESTION = "When did the line reopen?"


def format_docs(docs) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


def stock_chain(llm):
    retriever = InMemoryVectorStore.from_documents(DOCS, DeterministicFakeEmbedding(size=32)).as_retriever(
        search_kwargs={"k": 3})
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | ChatPromptTemplate.from_template(
        TEMPLATE) | llm


def test_a_stock_chain_caches_the_documents_when_the_separator_is_given():
    engine = fresh_engine()
    chain = stock_chain(ChatBlockRAG(engine=engine, max_tokens=6, context_separator="\n\n"))
    first, second = chain.invoke(QUESTION), chain.invoke(QUESTION)
    retrieved = [d.page_content for d in InMemoryVectorStore.from_documents(
        DOCS, DeterministicFakeEmbedding(size=32)).similarity_search(QUESTION, k=3)]
    blocks = [Passage(PREAMBLE)] + [Passage(text) for text in retrieved]  # the preamble is a block of its own
    context = len(engine.prefix_ids()) + sum(len(engine.block_ids(p)) for p in blocks)
    assert first.usage_metadata["input_token_details"] == {"cache_read": 0, "cache_creation": context}
    assert second.usage_metadata["input_token_details"] == {"cache_read": context, "cache_creation": 0}
    assert second.usage_metadata["input_tokens"] == context + len(engine.final_ids(f"Question: {QUESTION}"))
    # the same prompt the engine is given directly: passages in order, the question as the final block
    direct = engine.generate(blocks, f"Question: {QUESTION}", max_new_tokens=6)
    assert second.text == direct.text == first.text


def test_without_the_separator_only_block_0_is_cached():
    engine = fresh_engine()
    chain = stock_chain(ChatBlockRAG(engine=engine, max_tokens=6))
    chain.invoke(QUESTION)
    again = chain.invoke(QUESTION)
    # control: the documents are part of the one human message, prefilled in full every time
    assert again.usage_metadata["input_token_details"] == {"cache_read": len(engine.prefix_ids()),
                                                            "cache_creation": 0}
    with pytest.raises(InvalidInputError, match="non-empty context_separator"):
        ChatBlockRAG(engine=engine, context_separator="")
