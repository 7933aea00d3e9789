"""Engines shared across component instances, and retrieved passages turned into engine inputs.

Engines named by `model_name=` are shared per process through `BlockEngine.shared`; nothing is loaded at
construction time.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from llama_index.core.schema import BaseNode, MetadataMode

from blockrag import BlockEngine, KVBlock, Passage

BLOCK_KEY = "block_key"
"""Node metadata key that carries the content key of a passage's cached KV block."""

T = TypeVar("T")


async def iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator on one worker thread and yield its items on the event loop.

    One thread for the whole iteration, not one hop per item: fewer thread switches, and the
    generator's contexts are entered and closed on the same thread. Closing this iterator early
    stops the producer at its next item.
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
    return engine.passage_or_block(passage.text, passage.title, node.metadata.get(BLOCK_KEY))
