"""Framework clients talk to the server unchanged: LangChain ChatOpenAI in an LCEL RAG chain, LlamaIndex OpenAILike."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
langchain_openai = pytest.importorskip("langchain_openai")
openai_like = pytest.importorskip("llama_index.llms.openai_like")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough  # noqa: E402
from serve_helpers import DOCS, ThreadServer, tiny_app  # noqa: E402

MODEL = "tiny-random"
CORPUS = [Document(page_content=d["text"], metadata={"title": d["title"]}) for d in DOCS] + [
    Document(page_content="Block attention caches each retrieved passage's keys and values.",
             metadata={"title": "Block attention"})]


@pytest.fixture(scope="module")
def server():
    with ThreadServer(tiny_app()) as s:
        yield s


def _retrieve(question: str) -> list[Document]:
    """A deterministic keyword retriever (the chain's shape is what is tested, not retrieval quality)."""
    words = set(question.lower().replace("?", "").split())
    ranked = sorted(CORPUS, key=lambda d: -len(words & set(d.page_content.lower().split())))
    return ranked[:2]


def _chain(llm):
    def answer(inputs: dict):
        documents = [{"title": d.metadata["title"], "text": d.page_content} for d in inputs["docs"]]
        messages = [("system", "Answer from the documents."), ("human", inputs["question"])]
        return llm.invoke(messages, extra_body={"documents": documents})

    return RunnableParallel(docs=RunnableLambda(_retrieve), question=RunnablePassthrough()) | RunnableLambda(answer)


def test_langchain_chat_openai_lcel_rag_chain(server):
    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL, max_tokens=8,
                                      temperature=0, max_retries=0)
    chain = _chain(llm)
    first = chain.invoke("What is the capital of France?")
    second = chain.invoke("What is the capital of France?")
    assert isinstance(first.content, str) and first.content == second.content
    assert first.usage_metadata["output_tokens"] <= 8
    assert first.usage_metadata["input_token_details"].get("cache_read", 0) < second.usage_metadata[
        "input_token_details"]["cache_read"]
    assert second.usage_metadata["input_tokens"] >= second.usage_metadata["input_token_details"]["cache_read"]
    assert second.response_metadata["model_name"] == MODEL
    streamed = "".join(chunk.content for chunk in llm.stream("Say something.", extra_body={"documents": DOCS}))
    assert streamed == llm.invoke("Say something.", extra_body={"documents": DOCS}).content
    assert asyncio.run(llm.ainvoke("Say something.", extra_body={"documents": DOCS})).content == streamed


def test_llamaindex_openai_like(server):
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(model=MODEL, api_base=server.url + "/v1", api_key="unused", is_chat_model=True,
                                 max_tokens=8, temperature=0, max_retries=0, context_window=1024,
                                 additional_kwargs={"extra_body": {"documents": DOCS}})
    messages = [ChatMessage(role="user", content="What is the capital of France?")]
    first = llm.chat(messages)
    second = llm.chat(messages)
    assert first.message.content == second.message.content
    assert second.raw.usage.prompt_tokens_details.cached_tokens > 0
    streamed = "".join(r.delta or "" for r in llm.stream_chat(messages))
    assert streamed == first.message.content
    assert llm.complete("What is the capital of France?").text
