"""ChatBlockRAG beyond the standard suite: documents as cached blocks, conversion rules, callbacks, errors."""

from __future__ import annotations

import pytest
from langchain_blockrag import ChatBlockRAG, document_block, rag_messages
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_support import (
    fresh_engine,
    no_network,  # noqa: F401
    tiny_engine,
)

from blockrag import BlockEngine, Passage
from blockrag.chat import chat_segments
from blockrag.errors import InvalidInputError

DOCS = [
    Document("The Calder Fell line reopened to Harrowgill in 1994.", metadata={"title": "Reopening"}),
    Document("Skelwith Tunnel is 212 metres long."),
]
PASSAGES = [Passage("The Calder Fell line reopened to Harrowgill in 1994.", "Reopening"),
            Passage("Skelwith Tunnel is 212 metres long.")]


@pytest.fixture
def engine() -> BlockEngine:
    return fresh_engine()  # an empty block store per test


def test_documents_become_cached_blocks(engine):
    chat = ChatBlockRAG(engine=engine, max_tokens=8)
    messages = rag_messages("When did the line reopen?", DOCS)
    first, second = chat.invoke(messages), chat.invoke(messages)
    context = len(engine.prefix_ids()) + sum(len(engine.block_ids(p)) for p in PASSAGES)
    assert first.usage_metadata["input_token_details"] == {"cache_read": 0, "cache_creation": context}
    assert second.usage_metadata["input_token_details"] == {"cache_read": context, "cache_creation": 0}
    assert second.usage_metadata["input_tokens"] == context + len(engine.final_ids("When did the line reopen?"))
    assert second.usage_metadata["output_tokens"] == 8
    # the same answer as the engine's own call with the same passages
    direct = engine.generate(PASSAGES, "When did the line reopen?", max_new_tokens=8)
    assert first.text == second.text == direct.text
    assert second.response_metadata["model_name"] == "LlamaForCausalLM"


def test_block_key_in_extras_serves_a_block_rendered_differently(engine):
    (stored,) = engine.encode([Passage("Skelwith Tunnel is 212 metres long.", "Skelwith Tunnel")])
    doc = Document("Skelwith Tunnel is 212 metres long.", metadata={"block_key": stored.key})  # no title here
    block = document_block(doc)
    assert block["type"] == "text-plain" and block["extras"]["block_key"] == stored.key
    reply = ChatBlockRAG(engine=engine, max_tokens=4).invoke(rag_messages("How long?", [doc]))
    assert reply.usage_metadata["input_token_details"]["cache_read"] >= stored.num_tokens
    # negative control: without the key, the untitled text is a different block, encoded now
    other = ChatBlockRAG(engine=BlockEngine(engine.model, engine.tokenizer), max_tokens=4).invoke(
        rag_messages("How long?", [Document(doc.page_content)]))
    assert other.usage_metadata["input_token_details"]["cache_read"] == 0


def test_full_mode_per_call(engine):
    chat = ChatBlockRAG(engine=engine, max_tokens=6)
    chat.invoke(rag_messages("When?", DOCS))
    full = chat.invoke(rag_messages("When?", DOCS), mode="full")
    assert full.usage_metadata["input_token_details"] == {"cache_read": 0, "cache_creation": 0}
    assert full.response_metadata["mode"] == "full"


def test_system_message_is_the_instruction_and_history_turns_are_cached_blocks():
    engine = tiny_engine()
    chat = ChatBlockRAG(engine=engine, max_tokens=6)
    reply = chat.invoke([SystemMessage("Answer in one word."), HumanMessage("Where is the depot?")])
    assert reply.text == engine.generate([], "Where is the depot?", instruction="Answer in one word.",
                                         max_new_tokens=6).text
    history = [SystemMessage("Be brief."), HumanMessage("hello"), AIMessage("hello"), HumanMessage("how are you")]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}]
    reply = chat.invoke(history)
    assert reply.text == engine.generate_segments(chat_segments(engine.tokenizer, messages), max_new_tokens=6).text
    first = reply.usage_metadata["input_token_details"]
    again = chat.invoke(history).usage_metadata["input_token_details"]
    assert first["cache_creation"] > 0 and again == {"cache_read": first["cache_creation"], "cache_creation": 0}
    # a ToolMessage turn is a block like the others once an answer follows it
    tool_turn = [*history, AIMessage("", tool_calls=[{"name": "clock", "args": {}, "id": "c1"}]),
                 ToolMessage("12:00", tool_call_id="c1"), AIMessage("noon"), HumanMessage("and now?")]
    later = chat.invoke(tool_turn).usage_metadata["input_token_details"]
    assert later["cache_read"] == first["cache_creation"] and later["cache_creation"] > 0


def test_a_long_chat_prefills_only_the_new_message():
    """20 turns: prefilled tokens stay those of the new message, cached tokens grow with the conversation."""
    engine = tiny_engine()
    chat = ChatBlockRAG(engine=engine, max_tokens=2)
    history, cached, prefilled = [SystemMessage("Be brief.")], [], []
    for turn in range(20):
        history.append(HumanMessage(f"q{turn}"))
        reply = chat.invoke(history)
        details = reply.usage_metadata["input_token_details"]
        cached.append(details["cache_read"])
        prefilled.append(reply.usage_metadata["input_tokens"] - details["cache_read"] - details["cache_creation"])
        history.append(AIMessage(reply.text))
    assert all(b > a for a, b in zip(cached[1:], cached[2:]))
    assert max(prefilled[1:]) <= 2 * min(prefilled[1:])  # flat: only the new message (its length varies a little)


def test_stop_sequence_cuts_the_answer():
    engine = tiny_engine()
    chat = ChatBlockRAG(engine=engine, max_tokens=24)
    full = chat.invoke("Hello").text
    stop = full[len(full) // 2 :][:3]
    assert stop.strip() and stop in full
    cut = chat.invoke("Hello", stop=[stop])
    assert cut.text == full[: full.index(stop)] and cut.response_metadata["finish_reason"] == "stop"
    assert ChatBlockRAG(engine=engine, max_tokens=24, stop=[stop]).invoke("Hello").text == cut.text


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def test_streaming_field_fires_token_callbacks():
    chat = ChatBlockRAG(engine=tiny_engine(), max_tokens=10, streaming=True)
    handler = _Tokens()
    reply = chat.invoke("Hello", config={"callbacks": [handler]})
    assert handler.tokens and "".join(handler.tokens) == reply.text
    assert reply.usage_metadata["output_tokens"] == 10


@pytest.mark.asyncio
async def test_async_stream_matches_and_can_stop_early():
    chat = ChatBlockRAG(engine=tiny_engine(), max_tokens=10)
    expected = chat.invoke(rag_messages("When?", DOCS)).text
    chunks = [chunk async for chunk in chat.astream(rag_messages("When?", DOCS))]
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["input_tokens"] > 0
    async for _ in chat.astream("Hello"):
        break
    assert (await chat.ainvoke("Hello")).text


def test_refuses_what_it_cannot_read():
    chat = ChatBlockRAG(engine=tiny_engine())
    with pytest.raises(InvalidInputError, match="image"):
        chat.invoke([HumanMessage([{"type": "image", "url": "https://example.org/x.png"}, "What is this?"])])
    with pytest.raises(InvalidInputError, match="inline 'text'"):
        chat.invoke([HumanMessage([{"type": "text-plain", "mime_type": "text/plain", "url": "https://x"}, "q"])])
    with pytest.raises(InvalidInputError, match="non-system"):
        chat.invoke([SystemMessage("Only a system prompt.")])
    with pytest.raises(InvalidInputError, match="call arguments"):
        chat.invoke("Hello", max_new_tokens=5)
    with pytest.raises(InvalidInputError, match="neither"):
        ChatBlockRAG()


def test_recompute_field_and_call_argument(engine):
    messages = rag_messages("When did the line reopen?", DOCS)
    full = ChatBlockRAG(engine=engine, max_tokens=6, mode="full").invoke(messages)
    recovered = ChatBlockRAG(engine=engine, max_tokens=6, recompute="all").invoke(messages)
    assert recovered.text == full.text and recovered.response_metadata["recomputed_tokens"] > 0
    per_call = ChatBlockRAG(engine=engine, max_tokens=6).invoke(messages, recompute="first:2")
    assert per_call.response_metadata["recomputed_tokens"] == 2 * len(DOCS)
    # a full-mode call ignores the model's recompute setting instead of failing
    chat = ChatBlockRAG(engine=engine, max_tokens=6, recompute="first:2")
    assert chat.invoke(messages, mode="full").text == full.text
