"""A conversation through the server: each finished turn is a cached block, only the new message is prefilled.

The stock openai client drives a 4-turn chat the way clients do: it resends the whole message list each turn,
with the assistant's previous answers appended. The expected layout is written out here by hand from the tiny
tokenizer's ChatML template (``blockrag.testing.CHATML_TEMPLATE``), and the expected usage from a content-keyed
store simulated with a set; each answer is compared with the engine's own ``generate_segments`` over that layout
and with greedy decoding of the block-masked reference. Negative control: the same conversation with its
history folded into the question (the server's old layout, still its fallback) reads none of it from cache.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from reference import reference_greedy  # noqa: E402
from serve_helpers import DOCS, ThreadServer, tiny_app  # noqa: E402

from blockrag import BlockEngine, Passage  # noqa: E402
from blockrag.prompt import Segment  # noqa: E402
from blockrag.serve.protocol import fold_conversation  # noqa: E402

MODEL = "tiny-random"
MAX_TOKENS = 6
QUESTIONS = ["Where is the river?", "And the bridge?", "Who built it?", "When was that?"]
USER_END = "<|im_end|>\n<|im_start|>assistant\n"  # what ChatML puts after a user message's content


@pytest.fixture(scope="module")
def server():
    with ThreadServer(tiny_app(max_tokens=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference_engine(server):
    """An engine of its own (empty store) over the server's model and tokenizer."""
    served = server.app.state.service.engine
    return BlockEngine(served.model, served.tokenizer, template="chat")


class Reply(NamedTuple):
    text: str
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    timing: dict[str, Any]
    sources: list[dict[str, Any]]


def ask(client, messages, documents, stream: bool) -> Reply:
    extra = {"documents": documents} if documents else {}
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, extra_body=extra)
        return Reply(r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens,
                     r.usage.prompt_tokens_details.cached_tokens, r.model_extra["blockrag"], r.model_extra["sources"])
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=extra))
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    usage = chunks[-1].usage
    return Reply("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), usage.completion_tokens,
                 usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, finish.model_extra["blockrag"],
                 finish.model_extra["sources"])


def converse(client, tag: str, documents, stream: bool) -> tuple[list[list[dict]], list[Reply]]:
    """4 turns; returns the message list sent at each turn and the replies."""
    messages = [{"role": "system", "content": f"Be brief ({tag})."}]
    sent, replies = [], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": f"{question} ({tag})"})
        sent.append(list(messages))
        replies.append(ask(client, messages, documents, stream))
        messages.append({"role": "assistant", "content": replies[-1].text})
    return sent, replies


def expected_layout(messages: list[dict], documents) -> tuple[list[str], str]:
    """(cached block texts, live text) written out by hand for ChatML: a one-turn request is the RAG prompt
    (system message as the instruction); with history, every finished turn is a block and the last user turn
    is either a plain ChatML turn (no documents) or the RAG turn (with documents)."""
    system, *turns, (_, question) = [(m["role"], m["content"]) for m in messages]
    passages = [f"Title: {d['title']}\n{d['text']}\n\n" for d in documents or ()]
    history = [f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
               for (_, u), (_, a) in zip(turns[::2], turns[1::2])]
    if documents or not turns:
        return [*history, f"<|im_start|>user\n{system[1]}\n\n", *passages], f"Question: {question}{USER_END}"
    return [f"<|im_start|>system\n{system[1]}<|im_end|>\n", *history], f"<|im_start|>user\n{question}{USER_END}"


def ids(tokenizer, text: str, first: bool) -> list[int]:
    return [tokenizer.bos_token_id] * first + tokenizer(text, add_special_tokens=False)["input_ids"]


def check_conversation(engine, sent, replies, documents, seen: set) -> None:
    """Every reply against the hand-written layout: usage from the simulated store, answer from the engine over
    the same segments and from the block-masked reference."""
    tok = engine.tokenizer
    for turn, (messages, reply) in enumerate(zip(sent, replies)):
        blocks, live = expected_layout(messages, documents)
        block_ids = [ids(tok, text, i == 0) for i, text in enumerate(blocks)]
        hits = [tuple(b) in seen for b in block_ids]
        seen.update(tuple(b) for b in block_ids)
        live_ids = ids(tok, live, False)
        assert reply.timing["layout"] == ("rag" if turn == 0 else "turns")
        assert reply.cached_tokens == sum(len(b) for b, hit in zip(block_ids, hits) if hit), turn
        assert reply.timing["encoded_tokens"] == sum(len(b) for b, hit in zip(block_ids, hits) if not hit), turn
        assert reply.timing["prefilled_tokens"] == len(live_ids), turn
        assert reply.prompt_tokens == sum(map(len, block_ids)) + len(live_ids)
        generation = engine.generate_segments([*map(Segment, blocks), Segment(live, cached=False)],
                                              max_new_tokens=MAX_TOKENS)
        assert [list(b.token_ids) for b in generation.prefill.blocks] == block_ids
        assert reply.text == generation.text and reply.completion_tokens == len(generation.token_ids), turn
        expected = reference_greedy(engine.model, block_ids, live_ids, MAX_TOKENS, engine.eos_ids)
        assert list(generation.token_ids) == expected, turn
        if documents:
            assert [s["cached"] for s in reply.sources] == [turn > 0] * len(documents)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_conversation_reads_its_earlier_turns_from_cache(client, reference_engine, stream):
    sent, replies = converse(client, f"chat-{stream}", None, stream)
    check_conversation(reference_engine, sent, replies, None, set())
    cached = [r.cached_tokens for r in replies]
    assert cached[1] < cached[2] < cached[3], cached  # the history grows and is served from cache
    # what is prefilled is the new message and the ChatML around it (13 tokens of the tiny BPE), at every turn
    overhead = {r.timing["prefilled_tokens"] - len(ids(reference_engine.tokenizer, m[-1]["content"], False))
                for m, r in zip(sent[1:], replies[1:])}
    assert len(overhead) == 1 and 0 < min(overhead) <= 16, overhead


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_documents_stay_passage_blocks_in_a_conversation(client, reference_engine, stream):
    documents = [{"title": d["title"], "text": f"{d['text']} (history-{stream})"} for d in DOCS]
    sent, replies = converse(client, f"docs-{stream}", documents, stream)
    check_conversation(reference_engine, sent, replies, documents, set())
    assert len({tuple(s["block_key"] for s in r.sources) for r in replies}) == 1  # the same blocks every turn
    assert replies[1].cached_tokens < replies[2].cached_tokens < replies[3].cached_tokens


def test_negative_control_the_folded_question_reads_no_history_from_cache(client, reference_engine):
    """The old layout (history folded into the question) over the same conversation: cached tokens stay those
    of the instruction and documents, while the prefilled question grows with every turn."""
    documents = [{"title": d["title"], "text": f"{d['text']} (folded)"} for d in DOCS]
    sent, replies = converse(client, "folded", documents, False)
    passages = [Passage(d["text"], d["title"]) for d in documents]
    folded = []
    for messages in sent:
        turns = [(m["role"], m["content"]) for m in messages[1:]]
        folded.append(reference_engine.generate(passages, fold_conversation(turns), instruction=messages[0]["content"],
                                                max_new_tokens=MAX_TOKENS).usage)
    assert len({u.cached_tokens for u in folded[1:]}) == 1  # instruction + documents only, every turn
    assert folded[1].prefilled_tokens < folded[2].prefilled_tokens < folded[3].prefilled_tokens
    assert replies[3].cached_tokens > folded[3].cached_tokens
    assert replies[3].timing["prefilled_tokens"] < folded[3].prefilled_tokens


def test_a_chat_template_that_rewrites_history_falls_back_to_folding():
    """A template whose rendering of a conversation does not extend its rendering of the earlier messages
    cannot be cut into turns: the server answers as before, history folded into the question."""
    app = tiny_app()
    served = app.state.service.engine
    reference = BlockEngine(served.model, served.tokenizer, template="chat")
    served.tokenizer = copy.copy(served.tokenizer)
    served.tokenizer.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [{"role": "user", "content": "Where is the river?"}, {"role": "assistant", "content": "North."},
                {"role": "user", "content": "And the bridge?"}]
    with ThreadServer(app) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        reply = ask(client, messages, DOCS, stream=False)
    assert reply.timing["layout"] == "folded"
    passages = [Passage(d["text"], d["title"]) for d in DOCS]
    question = fold_conversation([(m["role"], m["content"]) for m in messages])
    expected = reference.generate(passages, question, max_new_tokens=MAX_TOKENS)
    assert reply.text == expected.text and reply.prompt_tokens == expected.usage.prompt_tokens


def test_full_mode_runs_the_same_conversation_as_one_prefill(client):
    messages = [{"role": "user", "content": "Where is the river? (full)"}, {"role": "assistant", "content": "North."},
                {"role": "user", "content": "And the bridge? (full)"}]
    block = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body={"mode": "full"})
    assert full.model_extra["blockrag"]["layout"] == block.model_extra["blockrag"]["layout"] == "turns"
    assert full.usage.prompt_tokens == block.usage.prompt_tokens == full.model_extra["blockrag"]["prefilled_tokens"]
    assert full.usage.prompt_tokens_details.cached_tokens == 0


def test_one_turn_of_the_chat_rag_layout_is_the_templates_rag_prompt(reference_engine):
    """The layout of a conversation's last turn reduces to the template's own blocks for one user message,
    and a template that does not wrap a user message as the chat template does is refused (typed)."""
    from blockrag import InvalidInputError
    from blockrag.chat import chat_rag_segments
    from blockrag.template import BlockTemplate

    tok, template = reference_engine.tokenizer, reference_engine.template
    passages = [Passage(d["text"], d["title"]) for d in DOCS]
    segments = chat_rag_segments(tok, template, [{"role": "user", "content": "Where?"}], passages, "Be brief.")
    rendered = template.render(passages, "Where?", "Be brief.")
    assert [s.text for s in segments] == [rendered.prefix, *rendered.passages, rendered.final]
    assert [s.cached for s in segments] == [True, True, True, False]
    with pytest.raises(InvalidInputError, match="cannot be placed in a chat turn"):
        chat_rag_segments(tok, BlockTemplate.tulu3_block(), [{"role": "user", "content": "Where?"}], passages)
