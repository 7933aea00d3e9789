"""langchain-tests' ChatModelIntegrationTests against a tiny random model loaded from a local folder.

The tiny model's answers are noise; what is checked is the contract: messages in, AIMessage out, streaming
chunks, usage (with cache_read / cache_creation from the block cache), stop sequences, batching, async.
"""

from __future__ import annotations

import uuid

from langchain_blockrag import ChatBlockRAG, rag_messages
from langchain_core.documents import Document
from langchain_core.messages import AIMessage
from langchain_support import ASYNC_SUITE_MARKS, no_network, tiny_model_dir  # noqa: F401
from langchain_tests.integration_tests import ChatModelIntegrationTests


def _documents() -> list[Document]:
    # NOTE: a fresh passage per call, so its block is a miss the first time and a hit the second.
    tag = uuid.uuid4().hex[:8]
    return [
        Document(f"The Calder Fell line was rebuilt by volunteers ({tag}).", metadata={"title": "Rebuilding"}),
        Document(f"Its steam engines burn Welsh coal ({tag}).", metadata={"title": "Fuel"}),
    ]


class TestChatBlockRAGIntegration(ChatModelIntegrationTests):
    pytestmark = ASYNC_SUITE_MARKS

    @property
    def chat_model_class(self) -> type[ChatBlockRAG]:
        return ChatBlockRAG

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_model_dir("llama"), "max_tokens": 24}

    @property
    def model_override_value(self) -> str:
        return tiny_model_dir("qwen2", seed=1)

    @property
    def supported_usage_metadata_details(self) -> dict:
        details = ["cache_read_input", "cache_creation_input"]
        return {"invoke": details, "stream": details}

    def _model(self) -> ChatBlockRAG:
        return self.chat_model_class(**{**self.standard_chat_model_params, **self.chat_model_params})

    def _call(self, model: ChatBlockRAG, messages, stream: bool) -> AIMessage:
        if not stream:
            return model.invoke(messages)
        full = None
        for chunk in model.stream(messages):
            full = chunk if full is None else full + chunk
        return full

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        model, messages = self._model(), rag_messages("Who rebuilt the line?", _documents())
        model.invoke(messages)  # encodes and stores the passage blocks
        return self._call(model, messages, stream)

    def invoke_with_cache_creation_input(self, *, stream: bool = False) -> AIMessage:
        return self._call(self._model(), rag_messages("Who rebuilt the line?", _documents()), stream)
