"""langchain-tests' ChatModelUnitTests: construction, standard params, serialisation, init time."""

from __future__ import annotations

import pytest
from langchain_blockrag import ChatBlockRAG
from langchain_tests.unit_tests import ChatModelUnitTests

pytestmark = pytest.mark.disable_socket  # constructs models only: no network, not even unix sockets


class TestChatBlockRAGUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatBlockRAG]:
        return ChatBlockRAG

    @property
    def chat_model_params(self) -> dict:
        # NOTE: nothing is loaded at construction; the model would load on the first call.
        return {"model": "org/tiny-block-model"}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return {"BLOCKRAG_MODEL": "org/from-env-model"}, {}, {"model_name": "org/from-env-model"}
