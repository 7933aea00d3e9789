"""Chat turns as cached blocks: a conversation -> segments laid out by the model's own chat template.

Each finished turn (a user message and the assistant's answer, or a tool result) becomes a cached segment,
keyed by its content like a passage: the next request finds it in the store, so a new turn prefills only
the new user message and the assistant header. The text of each segment is cut from the chat template's own
rendering: segment k is what rendering messages[:k] adds to the rendering of the messages before it, so the
segments joined are exactly ``apply_chat_template(messages, add_generation_prompt=True)``.

A conversation answered over passages (``chat_rag_segments``) keeps that history and lays out its last user turn
like a one-turn RAG prompt of the engine's template, so its passages are the same blocks a one-turn request uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from blockrag.errors import InvalidInputError
from blockrag.prompt import Segment
from blockrag.results import Generation, GenerationStream
from blockrag.template import BlockTemplate, Passage

ROLES = ("system", "user", "assistant", "tool")
_CONTENT = "\u2063BLOCKRAG_TURN_CONTENT\u2063"


def _render(tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # a template's own rule, e.g. raise_exception('roles must alternate')
        raise InvalidInputError(f"expected a conversation the chat template accepts, found it refused: {e}") from None


def chat_segments(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
    """Segments of a conversation that ends with the message to answer (a user or tool message).

    Cached: the system message (if any) and every finished turn (user + assistant, tool results with the
    answer that follows them). Live: the last message and the assistant header the template adds.

    Raises:
        InvalidInputError: no chat template, an unknown role, a conversation that does not end with a user or
            tool message, or a chat template whose rendering of a conversation does not start with its
            rendering of the earlier messages (then turns cannot be cut into blocks).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("expected a tokenizer with a chat template for chat segments, found none")
    messages = [dict(m) for m in messages]
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise InvalidInputError(f"expected messages with a role in {ROLES} and text content, found "
                                    f"{ {k: message.get(k) for k in ('role',)} } at {index}")
    if not messages or messages[-1]["role"] not in ("user", "tool"):
        raise InvalidInputError("expected a conversation ending with a user (or tool) message to answer, found "
                                f"{messages[-1]['role'] if messages else 'no messages'}")
    # cut points: after the system message, after every assistant answer (a turn ends there)
    cuts = [i + 1 for i, m in enumerate(messages[:-1]) if m["role"] in ("system", "assistant")]
    segments: list[Segment] = []
    done, previous = 0, ""
    for cut in [*cuts, len(messages)]:
        last = cut == len(messages)
        if last:
            # NOTE: the live tail is cut at the last finished turn: everything after it is prefilled per request
            cut = max(cuts, default=0)
            text = _render(tokenizer, messages, True)
        else:
            text = _render(tokenizer, messages[:cut], False)
        if cut == done and not last:
            continue
        if not text.startswith(previous):
            raise InvalidInputError(
                "expected the chat template to render a conversation as its earlier messages' rendering plus the "
                f"new ones, found it rewriting earlier text (at message {done}); this template's turns cannot be "
                "cached as blocks")
        piece = text[len(previous):]
        if piece:
            segments.append(Segment(piece, cached=not last))
        previous, done = text, cut
    return segments


def _around_content(text: str, what: str) -> tuple[str, str]:
    """(text before, text after) the one placeholder content in a rendering."""
    if text.count(_CONTENT) != 1:
        raise InvalidInputError(f"expected the chat template to render {what} verbatim once, found it "
                                f"{text.count(_CONTENT)} times; its turns cannot be cut into blocks")
    head, tail = text.split(_CONTENT)
    return head, tail


def chat_rag_segments(tokenizer, template: BlockTemplate, messages: Sequence[Mapping[str, str]],
                      passages: Sequence[Passage | str], instruction: str | None = None) -> list[Segment]:
    """Segments of a conversation whose last user message is answered over passages.

    The earlier turns are cut as in ``chat_segments`` (each finished turn a cached segment). The last user turn
    is laid out like a one-turn RAG prompt of ``template``: the turn's header with the instruction (cached),
    one cached segment per passage, rendered as ``template`` renders passage blocks (the very blocks a one-turn
    request over them uses), then the question and the assistant header (live). For a conversation of one
    user message these are exactly ``template``'s blocks.

    Args:
        tokenizer: a tokenizer with a chat template.
        template: the engine's BlockTemplate; its block 0 must start with the chat template's header of a user
            message and its final block end with what follows that message's content (as the "chat" preset's do).
        messages: ``{"role", "content"}`` dicts ending with the user message to answer.
        passages: the passages (texts or Passages) to answer from.
        instruction: the template's instruction text (its default if None).

    Raises:
        InvalidInputError: as ``chat_segments``; a conversation that does not end with a user message; a
            template whose blocks do not wrap a user message the way the chat template does (e.g.
            "tulu3-block" over a tokenizer whose chat template is not Tulu's).
    """
    if not messages or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
        raise InvalidInputError("expected a conversation ending with a user message to answer over passages, found "
                                f"{messages[-1].get('role') if messages else 'no messages'}")
    *earlier, last = messages
    *history, live = chat_segments(tokenizer, [*earlier, {"role": "user", "content": _CONTENT}])
    head, tail = _around_content(_render(tokenizer, [{"role": "user", "content": _CONTENT}], True), "a user message")
    prefix, final = template.render_prefix(instruction), template.render_final(last["content"])
    if not (prefix.startswith(head) and final.endswith(tail)):
        raise InvalidInputError(
            f"expected the {template.name!r} template's block 0 to start with the chat template's user header "
            f"{head!r} and its final block to end with {tail!r}, found {prefix[:len(head)]!r} and "
            f"{final[len(final) - len(tail):]!r}; its passages cannot be placed in a chat turn")
    # NOTE: the turn's own header replaces the one-turn header (which may open the conversation: BOS, a system turn)
    turn_head, turn_tail = _around_content(live.text, "the last user message")
    segments = list(history)
    if turn_head + prefix[len(head):]:
        segments.append(Segment(turn_head + prefix[len(head):]))
    segments += [Segment(template.render_passage(p)) for p in passages]
    segments.append(Segment(final[:len(final) - len(tail)] + turn_tail, cached=False))
    return segments


class ChatSession:
    """A conversation with an engine whose finished turns are cached blocks.

    ``ask`` prefills only the new user message (and the assistant header); after the answer, the finished
    turn is encoded and stored (``prepare=True``), so the next turn's time to first token does not grow with
    the conversation.

    Args:
        engine: a BlockEngine whose tokenizer has a chat template.
        system: an optional system message (block 0).
        prepare: encode each finished turn right after its answer (else on the next request).
    """

    def __init__(self, engine, system: str | None = None, *, prepare: bool = True) -> None:
        self.engine, self.prepare = engine, prepare
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def segments(self, text: str, role: str = "user") -> list[Segment]:
        """The segments of the conversation so far plus a new message."""
        return chat_segments(self.engine.tokenizer, [*self.messages, {"role": role, "content": text}])

    def ask(self, text: str, *, mode: str = "block", **sampling) -> Generation:
        """Answer a new user message; the message and the answer join the conversation."""
        generation = self.engine.generate_segments(self.segments(text), mode=mode, **sampling)
        self._finish(text, generation.text)
        return generation

    def stream(self, text: str, *, mode: str = "block", **sampling) -> GenerationStream:
        """Like ``ask``, as a stream of text deltas; the turn joins the conversation when the stream ends."""
        inner = self.engine.stream_segments(self.segments(text), mode=mode, **sampling)

        def deltas():
            yield from inner
            self._finish(text, inner.result.text)

        return GenerationStream(deltas(), inner._holder)

    def _finish(self, text: str, answer: str) -> None:
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        if self.prepare:
            # NOTE: the next request's segments with a placeholder question: its cached part is fixed already.
            self.engine.cache_segments(self.segments("."))
