"""Engines shared across component instances, and retrieved passages turned into engine inputs.

A model named by `model_name=` is loaded once per process and shared by every component that names
it; nothing is loaded at construction time.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

from llama_index.core.schema import BaseNode, MetadataMode

from blockrag import BlockEngine, KVBlock, Passage
from blockrag.errors import InvalidInputError

BLOCK_KEY = "block_key"
"""Node metadata key that carries the content key of a passage's cached KV block."""

_ENGINES: dict[tuple[str, str | None, str | None, str], BlockEngine] = {}
_LOCK = threading.Lock()
T = TypeVar("T")


def load_engine(model: str, *, device: str | None = None, dtype: str | None = None,
                template: str = "chat") -> BlockEngine:
    """The process-wide engine for a model name or local path, loaded on first use."""
    key = (model, device, dtype, template)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = BlockEngine.from_pretrained(model, device=device, dtype=dtype, template=template)
            _ENGINES[key] = engine
    return engine


def passage_input(engine: BlockEngine, text: str, title: str | None, block_key: str | None) -> Passage | KVBlock:
    """The cached block stored under `block_key` when the engine's store has it, else the passage text.

    Text is always a correct fallback: the engine keys blocks by content, so an identical rendering
    is served from the store (or encoded once) either way; the key also covers blocks whose stored
    rendering differs from (text, title).
    """
    if block_key:
        block = engine.store.get(block_key)
        if block is not None and block.fingerprint == engine.fingerprint:
            return block
    return Passage(text=text, title=title or None)


def blocks_by_key(engine: BlockEngine, keys: Sequence[str]) -> list[KVBlock]:
    """Cached blocks for content keys, from the engine's store.

    Raises:
        InvalidInputError: a key the store does not hold (or holds for another model).
    """
    blocks = []
    for key, block in zip(keys, engine.store.get_many(list(keys))):
        if block is None or block.fingerprint != engine.fingerprint:
            raise InvalidInputError(
                f"expected block key {key[:16]}... in the engine's store, found none for this model; pass the "
                "passage text instead (it is encoded and cached on first use) or re-run the KV transform"
            )
        blocks.append(block)
    return blocks


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator on one worker thread and yield its items on the event loop.

    One thread for the whole iteration, not one hop per item: the engine's stream holds
    `torch.inference_mode()` (thread-local) across its yields, so it must resume on the thread
    that started it. Closing this iterator early stops the producer at its next item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def produce() -> None:
        items = None
        try:
            items = make()
            for item in items:
                loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
                if stop.is_set():
                    break
        except BaseException as error:  # noqa: BLE001 - handed to the consumer and re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, ("error", error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # NOTE: on this thread, where the generator's contexts were entered.
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

    # NOTE: the context copy carries LlamaIndex's active span into the worker thread.
    worker = loop.run_in_executor(None, contextvars.copy_context().run, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "done":
                break
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        await worker


def node_passage(node: BaseNode) -> Passage:
    """The passage a node stands for: its bare content (no metadata) and its `title` metadata, if any.

    The KV transform and the synthesizer both render nodes through this one function, so a node's
    block key is the same at ingest and at question time.
    """
    title = node.metadata.get("title")
    return Passage(text=node.get_content(metadata_mode=MetadataMode.NONE), title=str(title) if title else None)


def node_input(engine: BlockEngine, node: BaseNode) -> Passage | KVBlock:
    """A node as engine input: its cached block by key when the store has it, else its passage."""
    passage = node_passage(node)
    return passage_input(engine, passage.text, passage.title, node.metadata.get(BLOCK_KEY))
