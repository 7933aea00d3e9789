"""BlockSynthesizer: retrieved nodes reach the LLM as separate cached blocks, not one flattened string.

Stock synthesizers join nodes into text chunks and prompts; this one hands each node to `BlockRAGLLM`
as its own passage (the stored KV block when the node carries a known `block_key`), with the query as
the final block. It works inside `RetrieverQueryEngine`, with and without streaming.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
from llama_index.core.response_synthesizers.base import BaseSynthesizer, QueryTextType
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.types import RESPONSE_TEXT_TYPE
from llama_index.llms.blockrag._runtime import node_input
from llama_index.llms.blockrag.base import BlockRAGLLM

from blockrag import KVBlock, Passage
from blockrag.errors import InvalidInputError

dispatcher = get_dispatcher(__name__)


class BlockSynthesizer(BaseSynthesizer):
    """Answer over retrieved nodes, one cached KV block per node.

    Args:
        llm: the `BlockRAGLLM` to answer with.
        streaming: return a `StreamingResponse` (or `AsyncStreamingResponse` from `asynthesize`).
        instruction: block-0 instruction (default: the LLM's `system_prompt`, else the template's).
    """

    def __init__(self, llm: BlockRAGLLM, *, streaming: bool = False, instruction: str | None = None,
                 callback_manager: CallbackManager | None = None, empty_response: str | None = None) -> None:
        if not isinstance(llm, BlockRAGLLM):
            raise InvalidInputError(f"expected a BlockRAGLLM, found {type(llm).__name__}")
        super().__init__(llm=llm, callback_manager=callback_manager, streaming=streaming,
                         empty_response=empty_response)
        self._instruction = instruction

    def _get_prompts(self) -> dict[str, Any]:
        return {}  # NOTE: the block template of the engine is the prompt; nothing here to swap.

    def _update_prompts(self, prompts: dict[str, Any]) -> None:
        return None

    # --- text chunks (the stock interface) -----------------------------------------------------------

    def _kwargs(self, passages: Sequence[str | Passage | KVBlock], extra: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"passages": list(passages), **extra}
        if self._instruction is not None:
            kwargs.setdefault("instruction", self._instruction)
        return kwargs

    def _answer(self, question: str, passages: Sequence[str | Passage | KVBlock],
                extra: dict[str, Any]) -> RESPONSE_TEXT_TYPE:
        kwargs = self._kwargs(passages, extra)
        if self._streaming:
            return _deltas(self._llm.stream_complete(question, **kwargs))
        return self._llm.complete(question, **kwargs).text

    async def _aanswer(self, question: str, passages: Sequence[str | Passage | KVBlock],
                       extra: dict[str, Any]) -> RESPONSE_TEXT_TYPE:
        kwargs = self._kwargs(passages, extra)
        if self._streaming:
            return _adeltas(await self._llm.astream_complete(question, **kwargs))
        return (await self._llm.acomplete(question, **kwargs)).text

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        """Each text chunk is one passage block."""
        return self._answer(query_str, text_chunks, response_kwargs)

    async def aget_response(self, query_str: str, text_chunks: Sequence[str],
                            **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        return await self._aanswer(query_str, text_chunks, response_kwargs)

    # --- nodes ---------------------------------------------------------------------------------------

    @dispatcher.span
    def synthesize(self, query: QueryTextType, nodes: list[NodeWithScore],
                   additional_source_nodes: Sequence[NodeWithScore] | None = None, **response_kwargs: Any):
        if not nodes:
            return super().synthesize(query, nodes, additional_source_nodes, **response_kwargs)
        query = QueryBundle(query_str=query) if isinstance(query, str) else query
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(CBEventType.SYNTHESIZE,
                                          payload={EventPayload.QUERY_STR: query.query_str}) as event:
            passages = [node_input(self._llm.engine, n.node) for n in nodes]
            answer = self._answer(query.query_str, passages, response_kwargs)
            response = self._prepare_response_output(answer, [*nodes, *(additional_source_nodes or [])])
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    @dispatcher.span
    async def asynthesize(self, query: QueryTextType, nodes: list[NodeWithScore],
                          additional_source_nodes: Sequence[NodeWithScore] | None = None, **response_kwargs: Any):
        if not nodes:
            return await super().asynthesize(query, nodes, additional_source_nodes, **response_kwargs)
        query = QueryBundle(query_str=query) if isinstance(query, str) else query
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(CBEventType.SYNTHESIZE,
                                          payload={EventPayload.QUERY_STR: query.query_str}) as event:
            passages = [node_input(self._llm.engine, n.node) for n in nodes]
            answer = await self._aanswer(query.query_str, passages, response_kwargs)
            response = self._prepare_response_output(answer, [*nodes, *(additional_source_nodes or [])])
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response


def _deltas(responses) -> Generator[str, None, None]:
    for response in responses:
        if response.delta:
            yield response.delta


async def _adeltas(responses) -> AsyncGenerator[str, None]:
    async for response in responses:
        if response.delta:
            yield response.delta
