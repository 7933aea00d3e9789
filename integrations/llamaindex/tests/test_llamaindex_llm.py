"""Contract tests of BlockRAGLLM: complete / stream / chat / async, kwargs, usage, callbacks, loading."""

from __future__ import annotations

import json

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.schema import TextNode
from llama_index.llms.blockrag import BlockKVTransform, BlockRAGLLM
from llamaindex_support import (
    no_network,  # noqa: F401
    record_events,
    stop_recording,
    tiny_engine,
    tiny_model_dir,
)

from blockrag import Passage
from blockrag.chat import chat_segments
from blockrag.errors import InvalidInputError

PASSAGES = [Passage("The Calder Fell line reopened in 1994.", "Reopening"), "Its engines burn Welsh coal."]


@pytest.fixture
def llm() -> BlockRAGLLM:
    return BlockRAGLLM(engine=tiny_engine(), max_new_tokens=12)


def test_complete_serves_passages_from_cached_blocks(llm):
    first = llm.complete("When did the line reopen?", passages=PASSAGES)
    second = llm.complete("When did the line reopen?", passages=PASSAGES)
    assert isinstance(first.text, str) and first.text
    assert first.raw["usage"]["encoded_tokens"] > 0 and first.raw["usage"]["cached_tokens"] == 0
    assert second.raw["usage"]["cached_tokens"] == first.raw["usage"]["encoded_tokens"]
    assert second.raw["usage"]["encoded_tokens"] == 0
    assert second.text == first.text  # greedy: cached blocks change nothing
    assert second.raw["model_name"] == "LlamaForCausalLM" and second.raw["finish_reason"] in ("stop", "length")


def test_stream_complete_has_cumulative_text_and_deltas(llm):
    expected = llm.complete("When did the line reopen?", passages=PASSAGES).text
    responses = list(llm.stream_complete("When did the line reopen?", passages=PASSAGES))
    assert "".join(r.delta for r in responses) == expected
    running = ""
    for response in responses:
        running += response.delta
        assert response.text == running
    assert responses[-1].raw["usage"]["generated_tokens"] == 12
    assert all(r.raw is None for r in responses[:-1])  # usage once, on the last response


def test_chat_and_stream_chat(llm):
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Answer briefly."),
                ChatMessage(role=MessageRole.USER, content="Where is the depot?")]
    reply = llm.chat(messages, passages=PASSAGES)
    assert reply.message.role == MessageRole.ASSISTANT and reply.message.content
    streamed = list(llm.stream_chat(messages, passages=PASSAGES))
    assert "".join(r.delta for r in streamed) == reply.message.content == streamed[-1].message.content
    # the system message is the block-0 instruction: the same as passing it explicitly
    direct = llm.complete("Where is the depot?", passages=PASSAGES, instruction="Answer briefly.")
    assert direct.text == reply.message.content


def test_a_conversation_is_cached_turn_by_turn(llm):
    """Earlier turns are cached blocks laid out by the chat template; a new turn prefills only its message."""
    messages = [ChatMessage(role=MessageRole.USER, content="hello"),
                ChatMessage(role=MessageRole.ASSISTANT, content="hello"),
                ChatMessage(role=MessageRole.USER, content="how are you")]
    reply = llm.chat(messages)
    chat = [{"role": "system", "content": llm.system_prompt}] if llm.system_prompt else []
    chat += [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "how are you"}]
    expected = llm.engine.generate_segments(chat_segments(llm.engine.tokenizer, chat),
                                            max_new_tokens=llm.max_new_tokens)
    assert reply.message.content == expected.text
    more = [*messages, ChatMessage(role=MessageRole.ASSISTANT, content=reply.message.content),
            ChatMessage(role=MessageRole.USER, content="and then?")]
    usage = llm.chat(more).raw["usage"]
    streamed = list(llm.stream_chat(more))
    assert "".join(r.delta for r in streamed) == streamed[-1].message.content
    assert usage["cached_tokens"] > 0 and usage["prefilled_tokens"] < usage["cached_tokens"] + usage["encoded_tokens"]


@pytest.mark.asyncio
async def test_async_variants_match_sync(llm):
    expected = llm.complete("Hey", passages=PASSAGES).text
    assert (await llm.acomplete("Hey", passages=PASSAGES)).text == expected
    deltas = [r.delta async for r in await llm.astream_complete("Hey", passages=PASSAGES)]
    assert "".join(deltas) == expected
    messages = [ChatMessage(role=MessageRole.USER, content="Hey")]
    assert (await llm.achat(messages, passages=PASSAGES)).message.content == expected
    chunks = [r async for r in await llm.astream_chat(messages, passages=PASSAGES)]
    assert chunks[-1].message.content == expected and chunks[-1].raw["usage"]["cached_tokens"] > 0


@pytest.mark.asyncio
async def test_async_stream_closed_early_stops_cleanly(llm):
    stream = await llm.astream_complete("Hey", passages=PASSAGES)
    async for _ in stream:
        break
    await stream.aclose()
    assert (await llm.acomplete("Hey")).text  # the engine is still usable


def test_block_keys_kwarg_uses_stored_blocks():
    engine = tiny_engine()
    llm = BlockRAGLLM(engine=engine, max_new_tokens=8)
    nodes = BlockKVTransform(engine)([TextNode(text="The Calder Fell line reopened in 1994.",
                                               metadata={"title": "Reopening"}),
                                      TextNode(text="Its engines burn Welsh coal.")])
    keys = [node.metadata["block_key"] for node in nodes]
    by_key = llm.complete("When?", block_keys=keys)
    assert by_key.raw["usage"]["encoded_tokens"] == len(engine.prefix_ids())  # only block 0 was new
    assert by_key.raw["usage"]["cached_tokens"] == sum(len(engine.block_ids(p)) for p in PASSAGES)
    assert llm.complete("When?", passages=PASSAGES).text == by_key.text
    with pytest.raises(InvalidInputError, match="block key"):
        llm.complete("When?", block_keys=["0" * 64])


def test_callback_events_pair_up(llm):
    debug = LlamaDebugHandler()
    llm.callback_manager = CallbackManager([debug])
    llm.complete("Hello", passages=PASSAGES)
    list(llm.stream_complete("Hello"))
    llm.chat([ChatMessage(role=MessageRole.USER, content="Hello")])
    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) == 3
    assert all(start.payload is not None and end.payload is not None for start, end in pairs)


def test_instrumentation_events_carry_usage(llm):
    log = record_events()
    try:
        llm.complete("Hello", passages=PASSAGES)
        llm.chat([ChatMessage(role=MessageRole.USER, content="Hello")])
    finally:
        stop_recording(log)
    assert len(log.of(LLMCompletionStartEvent)) == 1 and len(log.of(LLMChatStartEvent)) == 1
    (end,) = log.of(LLMCompletionEndEvent)
    assert end.response.raw["usage"]["prompt_tokens"] > 0
    assert len(log.of(LLMChatEndEvent)) == 1


def test_metadata_and_payload(llm):
    meta = llm.metadata
    assert meta.context_window == tiny_engine().max_positions and meta.num_output == 12
    assert meta.model_name == "LlamaForCausalLM" and meta.is_chat_model is False
    payload = json.dumps(llm.to_dict())  # JSON-safe: the engine is not part of the payload
    assert "engine" not in payload and "LlamaForCausalLM" in payload


def test_loads_a_local_model_lazily_once():
    path = tiny_model_dir("llama")
    llm = BlockRAGLLM(model_name=path, max_new_tokens=4)
    assert llm._engine is None  # construction loads nothing
    text = llm.complete("Hello").text
    assert llm.engine is BlockRAGLLM(model_name=path).engine  # one engine per model in the process
    assert text == BlockRAGLLM(engine=tiny_engine(), max_new_tokens=4).complete("Hello").text


def test_refuses_bad_input(llm):
    with pytest.raises(InvalidInputError, match="model_name"):
        BlockRAGLLM()
    with pytest.raises(InvalidInputError, match="keyword arguments"):
        llm.complete("Hello", passage=["typo"])
    with pytest.raises(InvalidInputError, match="a list"):
        llm.complete("Hello", passages="not a list")
    with pytest.raises(InvalidInputError, match="non-system"):
        llm.chat([ChatMessage(role=MessageRole.SYSTEM, content="only a system prompt")])
    with pytest.raises(InvalidInputError):
        llm.complete("   ")


def test_recompute_field_and_kwarg_recover_full_mode_answers():
    engine = tiny_engine()
    full = BlockRAGLLM(engine=engine, max_new_tokens=8, mode="full").complete("When?", passages=PASSAGES)
    recovered = BlockRAGLLM(engine=engine, max_new_tokens=8, recompute="all").complete("When?", passages=PASSAGES)
    assert recovered.text == full.text and recovered.raw["usage"]["recomputed_tokens"] > 0
    plain = BlockRAGLLM(engine=engine, max_new_tokens=8).complete("When?", passages=PASSAGES, recompute="first:2")
    assert plain.raw["usage"]["recomputed_tokens"] == 2 * len(PASSAGES)
    named = BlockRAGLLM(engine=engine, max_new_tokens=8, recompute="recommended").complete("When?", passages=PASSAGES)
    spelled = BlockRAGLLM(engine=engine, max_new_tokens=8).complete("When?", passages=PASSAGES,
                                                                      recompute="deviation:0.2")
    assert named.text == spelled.text
    assert named.raw["usage"]["recomputed_tokens"] == spelled.raw["usage"]["recomputed_tokens"] > 0
