"""Retrieved documents as content blocks, and an LCEL RAG chain (retriever + chat model).

A document becomes a LangChain v1 `text-plain` content block whose `extras` carry the content key of
its cached KV block; `ChatBlockRAG` turns each such block into one cached passage block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.content import PlainTextContentBlock, create_plaintext_block
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough

from langchain_blockrag._runtime import BLOCK_KEY


def document_block(document: Document) -> PlainTextContentBlock:
    """A `text-plain` content block for a retrieved document (title and block key from its metadata)."""
    metadata = document.metadata or {}
    extras: dict[str, Any] = {BLOCK_KEY: metadata.get(BLOCK_KEY)}
    if metadata.get("source") is not None:
        extras["source"] = str(metadata["source"])
    return create_plaintext_block(text=document.page_content, title=metadata.get("title"),
                                  id=document.id or None, **extras)


def rag_messages(question: str, documents: Sequence[Document], instruction: str | None = None) -> list[BaseMessage]:
    """Chat messages asking `question` over `documents`: one passage block per document, then the question."""
    content: list[Any] = [document_block(doc) for doc in documents]
    content.append({"type": "text", "text": question})
    messages: list[BaseMessage] = [SystemMessage(instruction)] if instruction else []
    messages.append(HumanMessage(content=content))
    return messages


def create_rag_chain(retriever: BaseRetriever, chat_model: BaseChatModel, *,
                     instruction: str | None = None) -> Runnable[str, dict[str, Any]]:
    """An LCEL chain: question -> {"question", "sources", "message", "answer"}.

    `sources` are the retrieved `Document`s, `message` the chat model's `AIMessage` (with usage), and
    `answer` its text. Streaming the chain streams `message` chunks.

    Example:
        ```python
        chain = create_rag_chain(BlockRAGRetriever(knowledge_base=kb, k=4), ChatBlockRAG(engine=kb.engine))
        result = chain.invoke("When did the line reopen?")
        print(result["answer"], [doc.metadata["source"] for doc in result["sources"]])
        ```
    """

    def to_messages(inputs: dict[str, Any]) -> list[BaseMessage]:
        return rag_messages(inputs["question"], inputs["sources"], instruction)

    def answer_text(inputs: dict[str, Any]) -> str:
        return inputs["message"].text

    return (
        RunnableParallel(question=RunnablePassthrough(), sources=retriever)
        | RunnablePassthrough.assign(message=RunnableLambda(to_messages) | chat_model)
        | RunnablePassthrough.assign(answer=RunnableLambda(answer_text))
    ).with_config(run_name="BlockRAGChain")
