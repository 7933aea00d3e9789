"""The HTTP app: OpenAI-compatible chat completions over a BlockEngine, with documents as cached blocks.

    POST /v1/chat/completions   OpenAI schema (+ documents / rag / mode), JSON or SSE stream
    GET  /v1/models             the one model this server answers with
    GET|POST /v1/kb/search      knowledge-base search (when started with a knowledge base)
    GET  /health                liveness, queue and cache counters
    GET  /                      the question-answering page (static HTML + JS)

Requests run one at a time per slot (``concurrency`` slots) on worker threads, because the engine's forward
passes are compute-bound; at most ``max_queue`` more wait for a slot, and the rest are refused at once with
429 and a Retry-After estimate (503 when a queued request waited ``queue_timeout_s``). A request holds its
slot until its answer ends or its client goes away: every request, streamed or not, runs as an engine stream
on one worker thread that stops at its next token once the client has left. The app talks to the engine and
knowledge base through their public API only (``stream``, ``stream_segments``, ``search``, token counting).

A one-turn request is the template's RAG prompt: instruction block, one block per passage, the question. A
conversation is cut at its finished turns by the model's chat template (``blockrag.chat``): each finished turn
is a cached block, keyed by content, so the next request, which resends the same earlier turns, finds them in
the store and prefills only its new message; passages sit in the last user turn as the same blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from blockrag.aio import iterate_in_thread
from blockrag.chat import chat_rag_segments, chat_segments
from blockrag.errors import BlockRAGError, InvalidInputError, PromptTooLongError
from blockrag.prompt import Segment
from blockrag.results import Generation, GenerationStream
from blockrag.serve.protocol import (
    APIError,
    ChatRequest,
    Layout,
    Limits,
    bad,
    parse_chat_request,
    parse_json_body,
    timing_json,
    usage_json,
)
from blockrag.template import Passage

logger = logging.getLogger("blockrag.serve")


@dataclass(frozen=True)
class ServeConfig:
    """How the server behaves.

    Attributes:
        model_id: the name clients send as ``model`` (and /v1/models lists).
        limits: per-request limits (sizes, counts, tokens).
        concurrency: requests computed at once (each on its own thread).
        max_queue: requests that may wait for a slot; beyond that -> 429 with Retry-After.
        queue_timeout_s: longest wait for a slot; then -> 503 with Retry-After.
        api_key: if set, /v1/* requires ``Authorization: Bearer <api_key>`` (else 401).
        aliases: further names accepted as ``model``.
    """

    model_id: str
    limits: Limits = field(default_factory=Limits)
    concurrency: int = 1
    max_queue: int = 64
    queue_timeout_s: float = 30.0
    api_key: str | None = None
    aliases: tuple[str, ...] = ()


class Slots:
    """A bounded waiting room in front of ``concurrency`` compute slots (one event loop, no threads)."""

    def __init__(self, concurrency: int, max_queue: int, timeout_s: float) -> None:
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.active = 0
        self.waiting = 0
        self.service_s = 0.5  # running mean of seconds per request, for Retry-After
        self._semaphore = asyncio.Semaphore(concurrency)

    def retry_after(self) -> int:
        return max(1, math.ceil((self.waiting + 1) * self.service_s / self.concurrency))

    async def acquire(self) -> Callable[[], None]:
        """Wait for a slot; returns its release function (idempotent). Raises APIError 429 / 503."""
        if self.active >= self.concurrency and self.waiting >= self.max_queue:
            raise APIError(429, f"server busy: {self.active} requests running and {self.waiting} queued (limit "
                                f"{self.max_queue}); retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())})
        self.waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"server busy: no compute slot within {self.timeout_s:g} s; retry later",
                           type="server_error", code="queue_timeout",
                           headers={"Retry-After": str(self.retry_after())}) from None
        finally:
            self.waiting -= 1
        self.active += 1
        start = time.perf_counter()
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.active -= 1
            self.service_s = 0.8 * self.service_s + 0.2 * (time.perf_counter() - start)
            self._semaphore.release()

        return release


@dataclass
class Counters:
    """What /health reports. disconnects: requests whose client went away before the answer ended (a stream
    mid-way, or a JSON request while it was waiting or computing); their generation stopped at its next token."""

    requests: int = 0
    errors: int = 0
    cached_tokens: int = 0
    encoded_tokens: int = 0
    prefilled_tokens: int = 0
    disconnects: int = 0


class Plan(NamedTuple):
    """A request in the engine's terms: segments (a conversation), else passages and ``ChatRequest.question``."""

    passages: list[Passage]
    sources: list[dict[str, Any]]
    layout: Layout
    segments: list[Segment] | None


class Answer(NamedTuple):
    """A request's generation, not yet run (a GenerationStream), its sources and layout."""

    stream: GenerationStream
    sources: list[dict[str, Any]]
    layout: Layout


class Service:
    """Turns a validated ChatRequest into engine calls (runs on worker threads)."""

    def __init__(self, engine, config: ServeConfig, kb=None) -> None:
        self.engine = engine
        self.config = config
        self.kb = kb

    def passages(self, req: ChatRequest) -> tuple[list[Passage], list[dict[str, Any]]]:
        """The passages to answer from, and their sources as returned to the client."""
        if req.rag_k is not None:
            if self.kb is None:
                raise bad("expected documents in the request: this server has no knowledge base for rag "
                          "(start it with --kb DIR)", param="rag", code="no_knowledge_base")
            hits = self.kb.search(req.query, req.rag_k)
            if not hits:
                raise bad("expected passages to answer from, found an empty knowledge base", param="rag",
                          code="empty_knowledge_base")
            sources = [{"id": h.passage_id, "title": h.title, "text": h.text, "score": round(h.score, 6),
                        "source": h.source, "doc_id": h.doc_id} for h in hits]
            return [Passage(h.text, h.title) for h in hits], sources
        sources = [{"id": f"doc-{i}", "title": d.title, "text": d.text} for i, d in enumerate(req.documents)]
        return [Passage(d.text, d.title) for d in req.documents], sources

    def layout(self, req: ChatRequest, passages: list[Passage]) -> tuple[Layout, list[Segment] | None]:
        """How the request's prompt is laid out, and its segments (None for "rag" and "folded": passages and a
        question, through ``engine.generate`` / ``stream``)."""
        if not req.history:
            return "rag", None
        if req.recompute is not None:
            # NOTE: selective recompute re-encodes tokens of a passages-and-question prompt; segment prompts have
            # no recompute path, so a conversation asking for it is laid out the folded way.
            return "folded", None
        messages = [{"role": role, "content": text} for role, text in req.history]
        messages.append({"role": "user", "content": req.query})
        tokenizer = self.engine.tokenizer
        try:
            if passages:
                # NOTE: as in a one-turn request, system messages are the instruction of the passages' turn
                return "turns", chat_rag_segments(tokenizer, self.engine.template, messages, passages, req.instruction)
            system = [{"role": "system", "content": req.instruction}] if req.instruction else []
            return "turns", chat_segments(tokenizer, [*system, *messages])
        except InvalidInputError as e:
            logger.info("earlier turns folded into the question: %s", e)
            return "folded", None

    def check_tokens(self, req: ChatRequest, passages: list[Passage], segments: list[Segment] | None) -> int:
        engine = self.engine
        if segments is not None:
            total = engine.prompts.from_segments(segments).num_tokens
        else:
            total = len(engine.prefix_ids(req.instruction)) + len(engine.final_ids(req.question))
            total += sum(len(engine.block_ids(p)) for p in passages)
        limit = self.config.limits.max_prompt_tokens or engine.max_positions
        if limit is not None and total + req.max_tokens > limit:
            raise bad(f"expected at most {limit} tokens (prompt + max_tokens), found {total} prompt tokens + "
                      f"{req.max_tokens} max_tokens; send fewer or shorter documents or lower max_tokens",
                      param="messages", code="context_length_exceeded")
        return total

    def plan(self, req: ChatRequest) -> Plan:
        passages, sources = self.passages(req)
        layout, segments = self.layout(req, passages)
        self.check_tokens(req, passages, segments)
        return Plan(passages, sources, layout, segments)

    @staticmethod
    def _sampling(req: ChatRequest) -> dict[str, Any]:
        return dict(mode=req.mode, max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    seed=req.seed, stop=req.stop)

    def start(self, req: ChatRequest) -> Answer:
        """The request's prompt built and checked (errors raised here); the model runs as the stream is read."""
        plan = self.plan(req)
        if plan.segments is not None:
            stream = self.engine.stream_segments(plan.segments, **self._sampling(req))
        else:
            stream = self.engine.stream(plan.passages, req.question, instruction=req.instruction,
                                        recompute=req.recompute, **self._sampling(req))
        return Answer(stream, plan.sources, plan.layout)


def _with_cache_flags(sources: list[dict[str, Any]], generation) -> list[dict[str, Any]]:
    """Mark each source with its block key and whether its KV came from the cache."""
    blocks = generation.prefill.blocks
    if generation.prefill.mode != "block" or len(blocks) < len(sources):
        return sources
    passage_blocks = blocks[len(blocks) - len(sources):]  # NOTE: the instruction (and earlier turns) come first
    return [{**s, "block_key": b.key, "cached": b.cached} for s, b in zip(sources, passage_blocks)]


def _error_response(error: APIError, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers={**headers, **error.headers})


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"expected a request body of at most {limit} bytes, found more", code="body_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def create_app(engine, config: ServeConfig, kb=None) -> FastAPI:
    """The FastAPI app serving ``engine`` (and ``kb`` for rag requests and search, if given)."""
    app = FastAPI(title="blockrag", docs_url=None, redoc_url=None, openapi_url=None)
    service = Service(engine, config, kb)
    slots = Slots(config.concurrency, config.max_queue, config.queue_timeout_s)
    counters = Counters()
    names = (config.model_id, *config.aliases)
    worker = {"x-blockrag-worker": str(os.getpid())}
    created = int(time.time())
    app.state.slots, app.state.counters, app.state.service = slots, counters, service

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "expected a valid API key in 'Authorization: Bearer <key>', found "
                                + ("none" if not header else "a wrong one"),
                           type="authentication_error", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        if error.status >= 500 or error.status == 429:
            logger.info("%s %s -> %d %s", request.method, request.url.path, error.status, error.code)
        return _error_response(error, worker)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _error_response(APIError(error.status_code, message, code=code), worker)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        counters.errors += 1
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, "internal server error (details are in the server log)",
                                        type="server_error", code="internal_error"), worker)

    async def run_engine(fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except BlockRAGError as e:
            raise _bad_input(e) from None

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = resources.files("blockrag.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers=worker)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": config.model_id, "knowledge_base": kb is not None,
                             "auth": config.api_key is not None, "active": slots.active, "waiting": slots.waiting,
                             "concurrency": slots.concurrency, "max_queue": slots.max_queue,
                             "counters": vars(counters), "store": repr(engine.store), "pid": os.getpid()},
                            headers=worker)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        data = [{"id": name, "object": "model", "created": created, "owned_by": "blockrag"} for name in names]
        return JSONResponse({"object": "list", "data": data}, headers=worker)

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> JSONResponse:
        authorize(request)
        if model not in names:
            raise APIError(404, f"expected a model in {list(names)}, found {model!r}", param="model",
                           code="model_not_found")
        return JSONResponse({"id": model, "object": "model", "created": created, "owned_by": "blockrag"},
                            headers=worker)

    async def search(request: Request, query: Any, k: Any) -> JSONResponse:
        authorize(request)
        if kb is None:
            raise APIError(404, "this server has no knowledge base (start it with --kb DIR)",
                           code="no_knowledge_base")
        if not isinstance(query, str) or not query.strip():
            raise bad(f"expected a non-empty query string, found {query!r}", param="query")
        if isinstance(k, str):
            k = int(k) if k.isdigit() else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.limits.max_documents:
            raise bad(f"expected an integer 1 <= k <= {config.limits.max_documents}, found {k!r}", param="k")
        hits = await run_engine(kb.search, query, k)
        return JSONResponse({"object": "list", "data": [h.to_dict() for h in hits]}, headers=worker)

    @app.get("/v1/kb/search")
    async def search_get(request: Request, query: str = "", k: str = "5") -> JSONResponse:
        return await search(request, query, k)

    @app.post("/v1/kb/search")
    async def search_post(request: Request) -> JSONResponse:
        authorize(request)
        body = parse_json_body(await _read_body(request, config.limits.max_body_bytes))
        return await search(request, body.get("query"), body.get("k", 5))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request)
        body = parse_json_body(await _read_body(request, config.limits.max_body_bytes))
        req = parse_chat_request(body, config.limits)
        if req.model not in names:
            raise APIError(404, f"expected a model in {list(names)}, found {req.model!r}", param="model",
                           code="model_not_found")
        release = await slots.acquire()
        handed_over = False
        try:
            counters.requests += 1
            ident, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            if req.stream:
                answer = await run_engine(service.start, req)
                started: list[bool] = []
                events = _stream_events(answer, req, ident, now, release, counters, started)

                def release_unstarted() -> None:
                    # NOTE: a client gone before the first chunk leaves the generator unstarted: its finally never runs.
                    if not started:
                        release()

                handed_over = True
                return StreamingResponse(events, media_type="text/event-stream",
                                         background=BackgroundTask(release_unstarted),
                                         headers={**worker, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            # NOTE: a client that gave up while queued costs nothing; one that leaves later stops the generation
            generation = None
            if not await request.is_disconnected():
                answer = await run_engine(service.start, req)
                generation = await _run_while_connected(answer.stream, request)
            if generation is None:
                counters.disconnects += 1
                logger.info("request %s: client went away; generation stopped, slot freed", ident)
                return Response(status_code=499, headers=worker)  # nginx's "client closed request"; nobody reads it
            _count(counters, generation.usage)
            sources, layout = _with_cache_flags(answer.sources, generation), answer.layout
            return JSONResponse({
                "id": ident, "object": "chat.completion", "created": now, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                             "finish_reason": generation.finish_reason, "logprobs": None}],
                "usage": usage_json(generation.usage), "sources": sources,
                "blockrag": timing_json(generation.usage, req.mode, layout), "system_fingerprint": None,
            }, headers=worker)
        finally:
            if not handed_over:
                release()

    return app


def _bad_input(error: BlockRAGError) -> APIError:
    if isinstance(error, PromptTooLongError):
        return bad(str(error), param="messages", code="context_length_exceeded")
    return bad(str(error))


async def _run_while_connected(stream: GenerationStream, request: Request) -> Generation | None:
    """Run a generation to its end on a worker thread; None if the client went away first.

    The same mechanism as a stream's (``iterate_in_thread``): the client is checked after every text delta, and
    closing the iteration stops the generation at its next token, after which the slot can be released.
    """
    deltas = iterate_in_thread(lambda: iter(stream))
    try:
        async for _ in deltas:
            if await request.is_disconnected():
                return None
    except BlockRAGError as e:
        raise _bad_input(e) from None
    finally:
        await deltas.aclose()
    return stream.result


def _count(counters: Counters, usage) -> None:
    counters.cached_tokens += usage.cached_tokens
    counters.encoded_tokens += usage.encoded_tokens
    counters.prefilled_tokens += usage.prefilled_tokens


async def _stream_events(answer: Answer, req: ChatRequest, ident: str, created: int, release: Callable[[], None],
                         counters: Counters, started: list[bool]) -> AsyncIterator[bytes]:
    """SSE chunks: role (+ sources) first, text deltas, the finish chunk, usage if asked, then [DONE].

    The slot is released only after the engine's thread has stopped (at its next token when the client left).
    """
    started.append(True)

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}

    stream, sources = answer.stream, answer.sources
    finished = False
    tokens = iterate_in_thread(lambda: iter(stream))
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}, sources=sources))
        try:
            async for delta in tokens:
                if delta:
                    yield _sse(chunk({"content": delta}))
        finally:
            await tokens.aclose()
        generation = stream.result
        _count(counters, generation.usage)
        sources = _with_cache_flags(sources, generation)
        timing = timing_json(generation.usage, req.mode, answer.layout)
        yield _sse(chunk({}, generation.finish_reason, sources=sources, blockrag=timing))
        if req.include_usage:
            yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model,
                        "choices": [], "usage": usage_json(generation.usage)})
        yield _sse("[DONE]")
        finished = True
    except BlockRAGError as e:
        yield _sse(APIError(400, str(e)).body())
        yield _sse("[DONE]")
        finished = True
    except Exception:  # noqa: BLE001 - the status line is sent already: report in-band, log the traceback
        logger.exception("stream %s failed", ident)
        counters.errors += 1
        yield _sse(APIError(500, "internal server error (details are in the server log)", type="server_error",
                            code="internal_error").body())
        yield _sse("[DONE]")
        finished = True
    finally:
        if not finished:
            counters.disconnects += 1
            logger.info("stream %s: client went away; slot freed", ident)
        release()
