"""``blockrag serve``: run the OpenAI-compatible server (needs the ``serve`` extra: ``pip install blockrag[serve]``).

    blockrag serve --model tiny-random                         documents sent with each request
    blockrag serve --kb kb/ --port 8000                        + rag requests answered from a knowledge base
    blockrag serve --model M --store redis://127.0.0.1:6379/0 --workers 4     workers share blocks in Redis

Options are collected into one JSON object that every worker process reads from the environment
(``BLOCKRAG_SERVE_OPTIONS``), so ``--workers N`` runs N identical apps behind one listening socket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

OPTIONS_ENV = "BLOCKRAG_SERVE_OPTIONS"
API_KEY_ENV = "BLOCKRAG_API_KEY"
INSTALL_HINT = "the server needs the serve extra: pip install 'blockrag[serve]'"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run an OpenAI-compatible HTTP server (documents as cached KV blocks)",
        description="Serve POST /v1/chat/completions (OpenAI schema; extra fields documents, rag, mode), "
                    "/v1/models, /v1/kb/search, /health and a question-answering page at /.")
    p.add_argument("--model", default=None, metavar="M",
                   help="any name blockrag.models loads: a short offline name, a .gguf file, a model directory, a Hub "
                        "name, or 'tiny-random' (answers are noise). Default: the knowledge base's model, else the "
                        "embedded default model")
    p.add_argument("--kb", default=None, metavar="DIR", help="knowledge base for rag requests and /v1/kb/search")
    p.add_argument("--store", default=None, metavar="URL",
                   help="KV store of the engine (memory://, disk:///path?max_bytes=10G, redis://host:port/db"
                        "?prefix=...&ttl=3600); a non-memory store gets an in-memory LRU in front; a knowledge base's "
                        "own blocks are read after it. Default: memory")
    p.add_argument("--memory-front", default="1G", metavar="SIZE",
                   help="bytes of the in-memory LRU in front of a --store that is not memory (default 1G; 0: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes, each with its own model copy (share blocks through --store redis://)")
    p.add_argument("--served-name", default=None, metavar="NAME",
                   help="the model name clients send (default: --model, or the knowledge base's model)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="requests computed at once per worker")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait per worker; beyond that 429 with Retry-After (default 64)")
    p.add_argument("--queue-timeout", type=float, default=30.0, metavar="S",
                   help="longest wait for a compute slot before 503 with Retry-After (default 30 s)")
    p.add_argument("--max-documents", type=int, default=32, metavar="N", help="most documents (or rag k) per request")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="most prompt + max_tokens tokens per request (default: the model's positions)")
    p.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", default="4M", metavar="SIZE", help="largest request body (default 4M)")
    p.add_argument("--template", choices=("chat", "tulu3-block"), default=None,
                   help="block prompt format (default: the knowledge base's, else 'chat')")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    return p


def options_from_args(args) -> dict[str, Any]:
    names = ("model", "kb", "store", "memory_front", "served_name", "concurrency", "max_queue", "queue_timeout",
             "max_documents", "max_prompt_tokens", "max_tokens", "max_body_bytes", "template", "device", "dtype")
    options = {name: getattr(args, name) for name in names}
    options["api_key"] = args.api_key or os.environ.get(API_KEY_ENV) or None
    options["verbose"] = bool(getattr(args, "verbose", False))
    return options


def _load_engine(model: str, template: str | None, device: str | None, dtype: str, store):
    from blockrag import BlockEngine
    from blockrag.models import load

    loaded = load(model, device=device, dtype=dtype)
    return BlockEngine(loaded.model, loaded.tokenizer, template=template or loaded.template or "chat", store=store)


def build_store(url: str | None, memory_front: str):
    from blockrag.store import MemoryKVStore, TieredKVStore, create_store
    from blockrag.store.factory import parse_size

    if url is None:
        return MemoryKVStore()
    store = create_store(url)
    front = parse_size(memory_front)
    if front and not isinstance(store, (MemoryKVStore, TieredKVStore)):
        # NOTE: serving keeps answering when the shared tier cannot write; the block stays in memory.
        store = TieredKVStore(MemoryKVStore(max_bytes=front), store, tolerate_write_errors=True)
    return store


def build_app(options: dict[str, Any]):
    """The app for one worker: engine (+ knowledge base) loaded from ``options`` (see ``options_from_args``)."""
    from blockrag.serve.app import ServeConfig, create_app
    from blockrag.serve.protocol import Limits
    from blockrag.store.factory import parse_size

    kb = None
    recorded: dict[str, Any] = {}
    if options.get("kb"):
        from blockrag.index import KnowledgeBase

        recorded = KnowledgeBase.info(options["kb"])["model"]
    from blockrag.models import DEFAULT_MODEL

    model = options.get("model") or recorded.get("name") or DEFAULT_MODEL
    template = options.get("template") or recorded.get("template")
    if template not in (None, "chat", "tulu3-block"):
        template = "chat"  # a custom template cannot be rebuilt from its name
    engine = _load_engine(model, template, options.get("device"), options.get("dtype", "auto"),
                          build_store(options.get("store"), options.get("memory_front", "1G")))
    if options.get("kb"):
        from blockrag.index import KnowledgeBase

        # NOTE: the knowledge base attaches its disk store behind the engine's own (memory, or --store's)
        kb = KnowledgeBase.open(options["kb"], engine, model_name=model)
    limits = Limits(max_body_bytes=parse_size(options.get("max_body_bytes", "4M")),
                    max_documents=options.get("max_documents", 32),
                    max_prompt_tokens=options.get("max_prompt_tokens"), max_tokens=options.get("max_tokens", 1024),
                    default_max_tokens=min(256, options.get("max_tokens", 1024)))
    config = ServeConfig(model_id=options.get("served_name") or model, limits=limits,
                         concurrency=options.get("concurrency", 1), max_queue=options.get("max_queue", 64),
                         queue_timeout_s=options.get("queue_timeout", 30.0), api_key=options.get("api_key"),
                         aliases=("blockrag",) if (options.get("served_name") or model) != "blockrag" else ())
    return create_app(engine, config, kb)


def worker_app():
    """uvicorn factory for ``--workers N``: each worker process builds its app from the environment."""
    options = json.loads(os.environ[OPTIONS_ENV])
    _quiet_logging(options.get("verbose", False))
    return build_app(options)


def _quiet_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def run(args) -> int:
    try:
        import uvicorn
    except ModuleNotFoundError:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    for name in ("workers", "concurrency", "max_documents", "max_tokens"):
        if getattr(args, name) < 1:
            print(f"error: expected --{name.replace('_', '-')} >= 1, found {getattr(args, name)}", file=sys.stderr)
            return 2
    options = options_from_args(args)
    _quiet_logging(options["verbose"])
    log_level = "info" if options["verbose"] else "warning"
    if args.workers == 1:
        app = build_app(options)  # NOTE: load errors surface here, before the port is bound
        served = options["served_name"] or app.state.service.engine.model_name
        print(f"blockrag serve: http://{args.host}:{args.port}/ (model {served})", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=log_level, access_log=options["verbose"])
        return 0
    os.environ[OPTIONS_ENV] = json.dumps(options)
    print(f"blockrag serve: http://{args.host}:{args.port}/ with {args.workers} workers", file=sys.stderr, flush=True)
    # NOTE: the supervisor pings each worker; one loading a model or decoding on a busy CPU can miss uvicorn's
    # default 5 s and be killed as hung, so allow a minute. A worker that dies is replaced.
    uvicorn.run("blockrag.serve.cli:worker_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                log_level=log_level, access_log=options["verbose"], timeout_worker_healthcheck=60)
    return 0
