"""ChatBlockRAG: a LangChain chat model over a blockrag `BlockEngine`.

Type conversion only. Messages become the engine's three prompt parts:

- system messages -> the instruction of block 0;
- `text-plain` content blocks (retrieved documents, see `langchain_blockrag.chains.document_block`) ->
  passages, each a cached KV block (looked up by the content key in `extras["block_key"]`, else by text);
- every other text -> the final block, which is the only part prefilled per request. One human message
  is the question as is.
- opt-in, for a stock prompt whose `{context}` is one string (`ChatPromptTemplate` + `format_docs`):
  with `context_separator` set (the string the user's `format_docs` joins documents with), the text of a
  human message is cut at that separator; every piece but the last becomes a passage block (cached), the
  last piece (the question) is the final block. The first piece holds whatever the prompt puts before the
  first document: a separator after that preamble makes it a block of its own, cached for every request.

A conversation (earlier `HumanMessage` / `AIMessage` / `ToolMessage` turns, no retrieved documents) is laid
out by the model's chat template instead, each finished turn a cached block (`blockrag.chat.chat_segments`):
a new turn prefills only the new message, so time to first token stays flat as the conversation grows.

The engine's `Usage` becomes `usage_metadata`: `input_token_details.cache_read` counts tokens served
from cached blocks, `cache_creation` tokens encoded (and stored) during the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables.config import run_in_executor
from langchain_core.utils import from_env
from pydantic import ConfigDict, Field

from blockrag import BlockEngine, Generation, KVBlock, Passage, Usage
from blockrag.aio import iterate_in_thread
from blockrag.chat import chat_segments
from blockrag.errors import InvalidInputError
from blockrag.prompt import Segment
from langchain_blockrag._runtime import BLOCK_KEY

_CALL_KWARGS = frozenset({"model", "mode", "max_tokens", "temperature", "top_p", "top_k", "seed", "recompute"})


@dataclass(frozen=True)
class EngineRequest:
    """What the engine is asked: block-0 instruction, context passages, final-block question; or, for a
    conversation, its segments (finished turns cached, the last message live)."""

    instruction: str | None
    passages: list[Passage | KVBlock]
    question: str
    segments: list[Segment] | None = None

    def run(self, engine: BlockEngine, method: str, options: dict[str, Any]):
        if self.segments is not None and options.get("recompute") is None:
            # NOTE: selective recompute works on RAG prompts; with it, the conversation is written out as before
            sampling = {k: v for k, v in options.items() if k != "recompute"}
            return getattr(engine, f"{method}_segments")(self.segments, **sampling)
        return getattr(engine, method)(self.passages, self.question, instruction=self.instruction, **options)


_CHAT_ROLES = {"User": "user", "Assistant": "assistant", "Tool": "tool"}


def _role(message: BaseMessage) -> str:
    if isinstance(message, HumanMessage):
        return "User"
    if isinstance(message, AIMessage):
        return "Assistant"
    if isinstance(message, ToolMessage):
        return "Tool"
    if isinstance(message, ChatMessage):
        return message.role.capitalize()
    return message.type.capitalize()


def to_engine_request(messages: Sequence[BaseMessage], engine: BlockEngine,
                      context_separator: str | None = None) -> EngineRequest:
    """Split chat messages into the engine's instruction, passages and question.

    With ``context_separator``, a human message's text is cut there: the pieces before the last become
    passages (in order), the last one stays the message's text.

    Raises:
        InvalidInputError: a content block the model cannot read (images, files, ...), a `text-plain`
            block without inline text, or no message with text to answer.
    """
    instruction: list[str] = []
    passages: list[Passage | KVBlock] = []
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        texts: list[str] = []
        for block in message.content_blocks:
            kind = block.get("type")
            if kind == "text":
                texts.append(block["text"])
            elif kind == "text-plain":
                if "text" not in block:
                    raise InvalidInputError(
                        f"expected a text-plain block with inline 'text' in message {index}, found one with "
                        f"only {sorted(k for k in block if k in ('url', 'base64', 'file_id'))}; load the text first"
                    )
                extras = block.get("extras") or {}
                passages.append(engine.passage_or_block(block["text"], block.get("title"), extras.get(BLOCK_KEY)))
            elif isinstance(message, AIMessage):
                continue  # NOTE: reasoning and tool-call blocks of earlier answers are not part of a text prompt.
            else:
                raise InvalidInputError(
                    f"expected 'text' or 'text-plain' content blocks, found {kind!r} in message {index} "
                    f"({message.type}); ChatBlockRAG reads text only"
                )
        text = "".join(texts).strip()
        if context_separator and isinstance(message, HumanMessage) and context_separator in text:
            *pieces, text = text.split(context_separator)
            passages += [engine.passage_or_block(piece.strip()) for piece in pieces if piece.strip()]
            text = text.strip()
        if not text:
            continue
        if isinstance(message, SystemMessage):
            instruction.append(text)
        else:
            turns.append((_role(message), text))
    if not turns:
        raise InvalidInputError(
            f"expected at least one non-system message with text to answer, found none among {len(messages)} "
            "message(s)"
        )
    if len(turns) == 1 and turns[0][0] == "User":
        question = turns[0][1]
    else:
        question = "\n".join(f"{role}: {text}" for role, text in turns)
        chat = [{"role": "system", "content": "\n\n".join(instruction)}] if instruction else []
        chat += [{"role": _CHAT_ROLES.get(role, role.lower()), "content": text} for role, text in turns]
        if not passages and getattr(engine.tokenizer, "chat_template", None) and chat[-1]["role"] in ("user", "tool"):
            return EngineRequest("\n\n".join(instruction) or None, [], question, chat_segments(engine.tokenizer, chat))
    return EngineRequest("\n\n".join(instruction) or None, passages, question)


def usage_metadata(usage: Usage) -> UsageMetadata:
    """LangChain usage of one request: cached block tokens are `cache_read`, encoded ones `cache_creation`."""
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.generated_tokens,
        total_tokens=usage.prompt_tokens + usage.generated_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cached_tokens, cache_creation=usage.encoded_tokens),
    )


class ChatBlockRAG(BaseChatModel):
    """Chat model whose retrieved passages are served from cached KV blocks (Block-Attention).

    Give either `model` (a Hub name or local path, loaded on first use and shared by every instance
    in the process) or `engine` (a ready `BlockEngine`, e.g. `knowledge_base.engine`, so the passages
    a knowledge base has already encoded are cache hits).

    Example:
        ```python
        from langchain_core.messages import HumanMessage
        from langchain_blockrag import ChatBlockRAG, document_block

        chat = ChatBlockRAG(model="Qwen/Qwen2.5-0.5B-Instruct", max_tokens=128)
        chat.invoke([HumanMessage([document_block(doc) for doc in docs] + [{"type": "text", "text": q}])])
        ```
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str | None = Field(default_factory=from_env("BLOCKRAG_MODEL", default=None), alias="model")
    """Hub name or local path of the model (env `BLOCKRAG_MODEL`); the engine's model name when `engine` is given."""
    engine: BlockEngine | None = Field(default=None, exclude=True)
    """A ready engine; takes precedence over loading `model`."""
    template: str = "chat"
    """Block template preset used when loading `model` ("chat" or "tulu3-block")."""
    device: str | None = None
    """Device when loading `model` (default: CUDA if available, else CPU)."""
    dtype: str | None = None
    """Torch dtype name when loading `model` (default: bfloat16 on CUDA, float32 on CPU)."""
    mode: Literal["block", "full"] = "block"
    """"block": cached passage blocks, only the final block prefilled; "full": one ordinary prefill."""
    recompute: str | None = None
    """Block mode: context tokens to re-encode with full attention at question time (training-free recovery for
    models never block fine-tuned): "recommended" (the measured best, deviation:0.2), or a selection such as
    "first:8" or "query:0.1"; see `blockrag.recompute`. None: plain block."""
    max_tokens: int = 256
    """Most tokens to generate."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seed for reproducible sampling."""
    stop: list[str] | None = None
    """Strings that end generation (the text is cut before them)."""
    streaming: bool = False
    """Whether `invoke` streams internally (fires `on_llm_new_token` callbacks)."""
    context_separator: str | None = None
    """Opt-in: cut human-message text at this string (what your `format_docs` joins documents with, e.g.
    "\n\n"): each piece but the last becomes a cached passage block, the last is the question."""

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        if self.engine is None and not self.model_name:
            raise InvalidInputError("expected `model` (a Hub name or local path) or `engine`, found neither")
        if not self.model_name:
            self.model_name = self.engine.model_name
        if self.context_separator == "":
            raise InvalidInputError("expected a non-empty context_separator (e.g. '\\n\\n'), found ''")

    @property
    def _llm_type(self) -> str:
        return "blockrag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        params = {"model_name": self.model_name, "mode": self.mode, "max_tokens": self.max_tokens,
                  "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}
        if self.engine is not None:
            # NOTE: a given engine's model may share its class name with others; the fingerprint tells them apart.
            params["fingerprint"] = self.engine.fingerprint
        else:
            params.update(template=self.template, dtype=self.dtype)
        return params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="blockrag",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # --- conversion --------------------------------------------------------------------------------

    def _resolve_engine(self, model: str | None) -> BlockEngine:
        if model and model != self.model_name:
            return BlockEngine.shared(model, device=self.device, dtype=self.dtype, template=self.template)
        if self.engine is not None:
            return self.engine
        return BlockEngine.shared(self.model_name, device=self.device, dtype=self.dtype, template=self.template)

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[BlockEngine, EngineRequest, dict[str, Any]]:
        unknown = sorted(set(kwargs) - _CALL_KWARGS)
        if unknown:
            raise InvalidInputError(f"expected call arguments among {sorted(_CALL_KWARGS)}, found {unknown}")
        engine = self._resolve_engine(kwargs.get("model"))
        mode = kwargs.get("mode", self.mode)
        options = dict(
            mode=mode,
            recompute=kwargs.get("recompute", self.recompute) if mode == "block" else None,
            max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            top_k=kwargs.get("top_k", self.top_k),
            seed=kwargs.get("seed", self.seed),
            stop=tuple(stop if stop is not None else self.stop or ()),
        )
        return engine, to_engine_request(messages, engine, self.context_separator), options

    @staticmethod
    def _info(engine: BlockEngine, generation: Generation, mode: str) -> dict[str, Any]:
        info: dict[str, Any] = {
            "model_name": engine.model_name,
            "finish_reason": generation.finish_reason,
            "mode": mode,
            "ttft_s": generation.usage.ttft_s,
            "decode_tokens_per_s": generation.usage.decode_tokens_per_s,
            "recomputed_tokens": generation.usage.recomputed_tokens,
        }
        if generation.warnings:
            info["warnings"] = list(generation.warnings)
        return info

    # --- generation --------------------------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        engine, request, options = self._prepare(messages, stop, kwargs)
        generation = request.run(engine, "generate", options)
        info = self._info(engine, generation, options["mode"])
        message = AIMessage(content=generation.text, usage_metadata=usage_metadata(generation.usage))
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)],
                          llm_output={"model_name": engine.model_name})

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        # NOTE: the model runs on a worker thread so the event loop stays free while it computes.
        return await run_in_executor(None, self._generate, messages, stop, None, **kwargs)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        engine, request, options = self._prepare(messages, stop, kwargs)
        stream = request.run(engine, "stream", options)
        for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:  # NOTE: the v1 stream() path passes none and fires the callback itself.
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        generation = stream.result
        # NOTE: usage and metadata ride on the last chunk only, or aggregation would add them up.
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage_metadata(generation.usage), chunk_position="last"),
            generation_info=self._info(engine, generation, options["mode"]),
        )

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in iterate_in_thread(lambda: self._stream(messages, stop, None, **kwargs)):
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
