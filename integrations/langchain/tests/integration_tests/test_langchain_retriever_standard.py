"""langchain-tests' RetrieversIntegrationTests over a knowledge base of the project's sample documents."""

from __future__ import annotations

from langchain_blockrag import BlockRAGRetriever
from langchain_support import ASYNC_SUITE_MARKS, no_network, sample_knowledge_base  # noqa: F401
from langchain_tests.integration_tests import RetrieversIntegrationTests


class TestBlockRAGRetrieverStandard(RetrieversIntegrationTests):
    pytestmark = ASYNC_SUITE_MARKS

    @property
    def retriever_constructor(self) -> type[BlockRAGRetriever]:
        return BlockRAGRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"knowledge_base": sample_knowledge_base(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "When did trains run all the way to Harrowgill again?"
