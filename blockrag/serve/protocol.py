"""The OpenAI chat-completions wire format: parse and validate a request body, shape responses and errors.

Only this module knows the JSON field names; the app passes a ``ChatRequest`` to the engine and turns a
``Generation`` back into JSON. Every rejected input raises ``APIError`` with a 4xx status and an
OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``; nothing here ever puts a traceback
in a response.

Extra request fields (sent by clients through ``extra_body``):
    documents: [{"title": str, "text": str}, ...]   passages to answer from, each a cached KV block
    rag: {"k": int}                                  retrieve k passages from the server's knowledge base
    mode: "block" | "full"                           cached blocks (default) or one ordinary prefill
    recompute: str                                   block mode: context tokens re-encoded with full attention
                                                     ("recommended", "first:8", "deviation:0.2", ...)

A conversation (earlier user / assistant / tool messages before the last user message) keeps its turns in
``ChatRequest.history``; the app lays them out as cached blocks (``Layout``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

ROLES = ("system", "developer", "user", "assistant", "tool")

Layout = Literal["rag", "turns", "folded"]
"""How a request's prompt was laid out: "rag" one turn (instruction block, passages, question); "turns" earlier
turns as cached blocks (``blockrag.chat``); "folded" earlier turns written into the question (a chat template
that cannot be cut into turns)."""


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-style JSON error with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (all configurable on the command line).

    Attributes:
        max_body_bytes: largest request body; larger -> 413.
        max_documents: most ``documents`` (or ``rag.k``) per request.
        max_document_chars: most characters of one document's text.
        max_prompt_tokens: most prompt tokens (instruction + documents + question); None: the model's positions.
        max_tokens: largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` when the request gives none.
        max_messages: most chat messages per request.
    """

    max_body_bytes: int = 4 << 20
    max_documents: int = 32
    max_document_chars: int = 64_000
    max_prompt_tokens: int | None = None
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_messages: int = 256


@dataclass(frozen=True)
class Document:
    text: str
    title: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request, in the engine's terms.

    Attributes:
        question: the last user message with the earlier turns folded in (``fold_conversation``), for a
            chat template that cannot cut them into blocks; the last user message alone when there are none.
        query: the last user message alone (what the model answers, and a knowledge-base search looks for).
        instruction: system / developer messages joined, or None for the template's default.
        history: the messages before the last user message, as (role, text) with role "user", "assistant"
            or "tool"; empty for a one-turn request.
    """

    model: str
    question: str
    query: str
    instruction: str | None
    history: tuple[tuple[str, str], ...]
    documents: tuple[Document, ...]
    rag_k: int | None
    mode: Literal["block", "full"]
    recompute: str | None
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or APIError 400 (non-UTF-8, malformed JSON, not an object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"expected a UTF-8 request body, found an invalid byte at offset {e.start}",
                  code="invalid_encoding") from None
    if not text.strip():
        raise bad("expected a JSON object in the request body, found an empty body", code="invalid_json")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad(f"expected a JSON request body, found malformed JSON ({e.msg} at line {e.lineno} column {e.colno})",
                  code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"expected a JSON object in the request body, found {type(body).__name__}", code="invalid_json")
    return body


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # NOTE: bool is an int subclass in Python; JSON true is never a number here.
    if isinstance(value, bool) and bool not in kinds:
        raise bad(f"expected {name} to be {what}, found a boolean", param=name, code="invalid_type")
    if not isinstance(value, kinds):
        raise bad(f"expected {name} to be {what}, found {_type_name(value)}", param=name, code="invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(f"expected {name} to be a finite number, found {value}", param=name)
    return value


def message_text(content: Any, index: int) -> str:
    """Text of a message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise bad(f"expected text content parts ({{'type': 'text', 'text': ...}}) in {param}, found "
                          f"{kind!r} at part {j}; this server accepts text only", param=param, code="invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"expected {param} to be a string or a list of text parts, found {_type_name(content)}", param=param,
              code="invalid_type")


def fold_conversation(turns: list[tuple[str, str]]) -> str:
    """One question from a conversation: earlier turns as a transcript, then the last user message.

    The fallback for a chat template whose turns cannot be cut into blocks: the history is in the question.
    """
    *history, (_, last) = turns
    if not history:
        return last
    lines = [f"{'User' if role == 'user' else 'Assistant'}: {text}" for role, text in history]
    return "Conversation so far:\n" + "\n".join(lines) + f"\n\nUser: {last}"


def _messages(body: dict, limits: Limits) -> tuple[str, str, str | None, tuple[tuple[str, str], ...]]:
    messages = body.get("messages")
    if messages is None:
        raise bad("expected 'messages', a non-empty list of chat messages, found none", param="messages",
                  code="missing_required_parameter")
    if not isinstance(messages, list):
        raise bad(f"expected messages to be a list, found {_type_name(messages)}", param="messages",
                  code="invalid_type")
    if not messages:
        raise bad("expected at least one message, found an empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise bad(f"expected at most {limits.max_messages} messages, found {len(messages)}", param="messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"expected messages[{i}] to be an object, found {_type_name(message)}",
                      param=f"messages[{i}]", code="invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"expected messages[{i}].role in {list(ROLES)}, found {role!r}", param=f"messages[{i}].role")
        text = message_text(message.get("content", ""), i) if message.get("content") is not None else ""
        if role in ("system", "developer"):
            if text.strip():
                system.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise bad("expected the last non-system message to be from the user, found "
                  f"{turns[-1][0] if turns else 'none'}", param="messages")
    if not turns[-1][1].strip():
        raise bad("expected a non-empty last user message, found an empty one", param="messages")
    return (fold_conversation(turns), turns[-1][1], ("\n\n".join(system) if system else None),
            tuple(turns[:-1]))


def _documents(body: dict, limits: Limits) -> tuple[Document, ...]:
    docs = body.get("documents")
    if docs is None:
        return ()
    if not isinstance(docs, list):
        raise bad(f"expected documents to be a list of {{title, text}} objects, found {_type_name(docs)}",
                  param="documents", code="invalid_type")
    if len(docs) > limits.max_documents:
        raise bad(f"expected at most {limits.max_documents} documents, found {len(docs)}", param="documents",
                  code="too_many_documents")
    out = []
    for i, doc in enumerate(docs):
        param = f"documents[{i}]"
        if isinstance(doc, str):
            doc = {"text": doc}
        if not isinstance(doc, dict):
            raise bad(f"expected {param} to be an object with 'text', found {_type_name(doc)}", param=param,
                      code="invalid_type")
        text, title = doc.get("text"), doc.get("title")
        if not isinstance(text, str):
            raise bad(f"expected {param}.text to be a string, found {_type_name(text)}", param=param + ".text",
                      code="invalid_type")
        if not text.strip():
            raise bad(f"expected {param}.text to be non-empty, found an empty text", param=param + ".text")
        if len(text) > limits.max_document_chars:
            raise bad(f"expected at most {limits.max_document_chars} characters in {param}.text, found {len(text)}",
                      param=param + ".text", code="document_too_long")
        if title is not None and not isinstance(title, str):
            raise bad(f"expected {param}.title to be a string, found {_type_name(title)}", param=param + ".title",
                      code="invalid_type")
        out.append(Document(text=text, title=title or None))
    return tuple(out)


def _rag_k(body: dict, limits: Limits) -> int | None:
    rag = body.get("rag")
    if rag is None or rag is False:
        return None
    if rag is True:
        rag = {}
    if not isinstance(rag, dict):
        raise bad(f"expected rag to be an object such as {{'k': 4}}, found {_type_name(rag)}", param="rag",
                  code="invalid_type")
    k = _get(rag, "k", (int,), 4, "an integer")
    if not 1 <= k <= limits.max_documents:
        raise bad(f"expected 1 <= rag.k <= {limits.max_documents}, found {k}", param="rag.k")
    return k


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad(f"expected stop to be a string or a list of strings, found {_type_name(stop)}", param="stop",
                  code="invalid_type")
    if len(stop) > 4:
        raise bad(f"expected at most 4 stop sequences, found {len(stop)}", param="stop")
    return tuple(s for s in stop if s)


def parse_chat_request(body: dict[str, Any], limits: Limits) -> ChatRequest:
    """Validate a chat-completions body (see the module docstring); raises APIError 400 on bad input."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad(f"expected model to be a non-empty string, found {_type_name(model)}", param="model",
                  code="missing_required_parameter" if model is None else "invalid_type")
    question, query, instruction, history = _messages(body, limits)
    documents = _documents(body, limits)
    rag_k = _rag_k(body, limits)
    if documents and rag_k is not None:
        raise bad("expected either documents or rag, found both", param="rag")
    mode = _get(body, "mode", (str,), "block", "'block' or 'full'")
    if mode not in ("block", "full"):
        raise bad(f"expected mode 'block' or 'full', found {mode!r}", param="mode")
    recompute = _get(body, "recompute", (str,), None, "a selection such as 'recommended' or 'first:8'")
    if recompute is not None:
        from blockrag.errors import InvalidInputError
        from blockrag.recompute import Recompute

        try:
            Recompute.parse(recompute)
        except InvalidInputError as e:
            raise bad(str(e), param="recompute") from None
        if mode != "block":
            raise bad(f"expected recompute only with mode 'block', found mode {mode!r}", param="recompute")
    stream = _get(body, "stream", (bool,), False, "a boolean")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    include_usage = _get(options, "include_usage", (bool,), False, "a boolean")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get({name: max_tokens}, name, (int,), limits.default_max_tokens, "an integer")
    if max_tokens < 1:
        raise bad(f"expected {name} >= 1, found {max_tokens}", param=name)
    if max_tokens > limits.max_tokens:
        raise bad(f"expected {name} <= {limits.max_tokens} (this server's limit), found {max_tokens}", param=name)
    temperature = float(_get(body, "temperature", (int, float), 0.0, "a number"))
    if not 0.0 <= temperature <= 2.0:
        raise bad(f"expected 0 <= temperature <= 2, found {temperature}", param="temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0, "a number"))
    if not 0.0 < top_p <= 1.0:
        raise bad(f"expected 0 < top_p <= 1, found {top_p}", param="top_p")
    seed = _get(body, "seed", (int,), None, "an integer")
    n = _get(body, "n", (int,), 1, "an integer")
    if n != 1:
        raise bad(f"expected n = 1 (one choice per request), found {n}", param="n")
    return ChatRequest(model=model, question=question, query=query, instruction=instruction, history=history,
                       documents=documents, rag_k=rag_k, mode=mode, recompute=recompute, stream=stream,
                       include_usage=include_usage, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, stop=_stop(body))


def usage_json(usage) -> dict[str, Any]:
    """OpenAI ``usage`` from an engine Usage: cached_tokens are the context tokens served from cached blocks."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.generated_tokens,
        "total_tokens": usage.prompt_tokens + usage.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def timing_json(usage, mode: str, layout: Layout) -> dict[str, Any]:
    """The server's own accounting, beside OpenAI's usage (extra field ``blockrag``)."""
    return {
        "mode": mode,
        "layout": layout,
        "ttft_ms": round(usage.ttft_s * 1000, 3),
        "cached_tokens": usage.cached_tokens,
        "encoded_tokens": usage.encoded_tokens,
        "prefilled_tokens": usage.prefilled_tokens,
        "recomputed_tokens": usage.recomputed_tokens,
        "decode_tokens_per_s": round(usage.decode_tokens_per_s, 2),
    }
