"""BlockRAGLLM: a LlamaIndex LLM over a blockrag `BlockEngine`.

Type conversion only. A completion is the engine's question (the final block, the only part prefilled
per request); context arrives as kwargs, each passage one cached KV block:

- `passages=[...]`: texts, `blockrag.Passage`s or `KVBlock`s (encoded once, then served from the store);
- `block_keys=[...]`: content keys of blocks already in the engine's store (e.g. from `BlockKVTransform`);
- `instruction=...`: the block-0 instruction (default: `system_prompt`, else the template's).

Chat messages: system messages are the instruction, the rest the question; a conversation (earlier turns,
no passages) is laid out by the model's chat template with each finished turn a cached block
(`blockrag.chat.chat_segments`), so a new turn prefills only the new message. Usage (cached / encoded /
prefilled tokens, TTFT) is in each response's `raw["usage"]` (the last response of a stream).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any, Literal

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from blockrag import BlockEngine, Generation, KVBlock, Passage
from blockrag.aio import iterate_in_thread
from blockrag.chat import chat_segments
from blockrag.errors import InvalidInputError

_CALL_KWARGS = frozenset({"passages", "block_keys", "instruction", "mode", "max_new_tokens", "temperature",
                          "top_p", "top_k", "seed", "stop", "recompute"})
_ROLES = {MessageRole.USER: "User", MessageRole.ASSISTANT: "Assistant", MessageRole.TOOL: "Tool"}
_CHAT_ROLES = {"User": "user", "Assistant": "assistant", "Tool": "tool"}


def _usage(generation: Generation) -> dict[str, Any]:
    usage = asdict(generation.usage)
    usage["prompt_tokens"] = generation.usage.prompt_tokens
    return usage


class BlockRAGLLM(CustomLLM):
    """LLM whose context passages are served from cached KV blocks (Block-Attention).

    Give either `model_name` (a Hub name or local path, loaded on first use and shared in the process)
    or `engine` (a ready `BlockEngine`, e.g. `knowledge_base.engine`).

    Example:
        ```python
        llm = BlockRAGLLM(engine=kb.engine, max_new_tokens=128)
        llm.complete("When did the line reopen?", passages=["The line reopened in 1994 ..."])
        ```
    """

    model_name: str = Field(default="", description="Hub name or local path (the engine's model name if given).")
    template: str = Field(default="chat", description="Block template preset used when loading `model_name`.")
    device: str | None = Field(default=None, description="Device when loading (default CUDA if available).")
    dtype: str | None = Field(default=None, description="Torch dtype name when loading (default bf16 on CUDA).")
    mode: Literal["block", "full"] = Field(default="block", description="'block' (cached passages) or 'full'.")
    recompute: str | None = Field(default=None, description=(
        "Block mode: context tokens re-encoded with full attention at question time (training-free recovery), "
        "'recommended' (the measured best, deviation:0.2) or a selection such as 'first:8'; see "
        "blockrag.recompute. None: plain block mode."))
    max_new_tokens: int = Field(default=256, gt=0, description="Most tokens to generate.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Sample among the k most likely tokens; 0 keeps all.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation.")
    context_window: int | None = Field(default=None, description="Defaults to the model's max positions.")

    _engine: BlockEngine | None = PrivateAttr(default=None)

    def __init__(self, *, engine: BlockEngine | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if engine is None and not self.model_name:
            raise InvalidInputError("expected `model_name` (a Hub name or local path) or `engine`, found neither")
        self._engine = engine
        if not self.model_name:
            self.model_name = engine.model_name

    @classmethod
    def class_name(cls) -> str:
        return "BlockRAGLLM"

    @property
    def engine(self) -> BlockEngine:
        """The engine (loaded on first use when built from `model_name`)."""
        if self._engine is None:
            self._engine = BlockEngine.shared(self.model_name, device=self.device, dtype=self.dtype,
                                              template=self.template)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        window = self.context_window or self.engine.max_positions or 4096
        return LLMMetadata(context_window=window, num_output=self.max_new_tokens, model_name=self.model_name,
                           is_chat_model=False)

    # --- conversion --------------------------------------------------------------------------------

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - _CALL_KWARGS)
        if unknown:
            raise InvalidInputError(f"expected keyword arguments among {sorted(_CALL_KWARGS)}, found {unknown}")
        mode = kwargs.get("mode", self.mode)
        return dict(
            mode=mode,
            recompute=kwargs.get("recompute", self.recompute) if mode == "block" else None,
            max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            top_k=kwargs.get("top_k", self.top_k),
            seed=kwargs.get("seed", self.seed),
            stop=tuple(kwargs.get("stop", self.stop)),
        )

    def _context(self, kwargs: dict[str, Any]) -> list[str | Passage | KVBlock]:
        passages = kwargs.get("passages") or []
        if isinstance(passages, (str, Passage, KVBlock)):
            raise InvalidInputError("expected `passages` to be a list, found a single item; wrap it in a list")
        return [*self.engine.stored_blocks(kwargs.get("block_keys") or []), *passages]

    def _completion_request(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        instruction = kwargs.get("instruction", None if formatted else self.system_prompt)
        return dict(passages=self._context(kwargs), question=prompt, instruction=instruction, **self._options(kwargs))

    def _chat_request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> dict[str, Any]:
        instruction = [m.content for m in messages if m.role == MessageRole.SYSTEM and m.content]
        turns = [(_ROLES.get(m.role, str(m.role.value).capitalize()), m.content.strip())
                 for m in messages if m.role != MessageRole.SYSTEM and m.content and m.content.strip()]
        if not turns:
            raise InvalidInputError(
                f"expected at least one non-system message with text, found none among {len(messages)} message(s)"
            )
        joined = "\n\n".join(instruction) or self.system_prompt
        if len(turns) == 1 and turns[0][0] == "User":
            question = turns[0][1]
        else:
            question = "\n".join(f"{role}: {text}" for role, text in turns)
            chat = [{"role": "system", "content": joined}] if joined else []
            chat += [{"role": _CHAT_ROLES.get(role, role.lower()), "content": text} for role, text in turns]
            if (not kwargs.get("passages") and not kwargs.get("block_keys") and "instruction" not in kwargs
                    and getattr(self.engine.tokenizer, "chat_template", None) and chat[-1]["role"] in ("user", "tool")):
                # NOTE: a conversation: each finished turn a cached block, only the new message prefilled
                # (selective recompute works on RAG prompts: with it, the conversation is written out as before)
                options = self._options(kwargs)
                if options.get("recompute") is None:
                    options.pop("recompute", None)
                    return dict(segments=chat_segments(self.engine.tokenizer, chat), **options)
        return dict(passages=self._context(kwargs), question=question,
                    instruction=kwargs.get("instruction", joined), **self._options(kwargs))

    def _extra(self, generation: Generation, mode: str) -> dict[str, Any]:
        return {"model_name": self.model_name, "finish_reason": generation.finish_reason, "mode": mode,
                "usage": _usage(generation), "warnings": list(generation.warnings)}

    # --- engine calls ------------------------------------------------------------------------------

    def _run(self, request: dict[str, Any]) -> tuple[Generation, dict[str, Any]]:
        generation = (self.engine.generate_segments if "segments" in request else self.engine.generate)(**request)
        return generation, self._extra(generation, request["mode"])

    def _run_stream(self, request: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any] | None]]:
        """(cumulative text, delta, None) per delta, then (text, "", extra) once the generation is done."""
        stream = (self.engine.stream_segments if "segments" in request else self.engine.stream)(**request)
        text = ""
        for delta in stream:
            text += delta
            yield text, delta, None
        yield text, "", self._extra(stream.result, request["mode"])

    # --- completion --------------------------------------------------------------------------------

    def _complete(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> CompletionResponse:
        generation, extra = self._run(self._completion_request(prompt, formatted, kwargs))
        return CompletionResponse(text=generation.text, raw=extra, additional_kwargs={"usage": extra["usage"]})

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        request = self._completion_request(prompt, formatted, kwargs)
        return self._responses(self._run_stream(request), completion=True)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        request = self._completion_request(prompt, formatted, kwargs)
        return self._aresponses(request, completion=True)

    # --- chat --------------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        generation, extra = self._run(self._chat_request(messages, kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=generation.text), raw=extra,
                            additional_kwargs={"usage": extra["usage"]})

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._chat_request(messages, kwargs)
        return self._responses(self._run_stream(request), completion=False)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._chat_request(messages, kwargs)
        generation, extra = await asyncio.to_thread(self._run, request)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=generation.text), raw=extra,
                            additional_kwargs={"usage": extra["usage"]})

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = self._chat_request(messages, kwargs)
        return self._aresponses(request, completion=False)

    # --- response shapes ---------------------------------------------------------------------------

    @staticmethod
    def _response(text: str, delta: str, extra: dict[str, Any] | None, completion: bool):
        kwargs = {"usage": extra["usage"]} if extra else {}
        if completion:
            return CompletionResponse(text=text, delta=delta, raw=extra, additional_kwargs=kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=extra,
                            additional_kwargs=kwargs)

    def _responses(self, items: Iterator[tuple[str, str, dict[str, Any] | None]], completion: bool):
        for text, delta, extra in items:
            yield self._response(text, delta, extra, completion)

    async def _aresponses(self, request: dict[str, Any], completion: bool):
        async for text, delta, extra in iterate_in_thread(lambda: self._run_stream(request)):
            yield self._response(text, delta, extra, completion)
