"""Engines shared across component instances, and retrieved passages turned into engine inputs.

LangChain constructs components often (per chain, per test, per `bind`), so a model named by
`model=` is loaded once per process and shared; nothing is loaded at construction time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from langchain_core.runnables.config import run_in_executor

from blockrag import BlockEngine, KVBlock, Passage

BLOCK_KEY = "block_key"
"""Metadata / content-block `extras` key that carries the content key of a passage's cached KV block."""

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

    worker = asyncio.ensure_future(run_in_executor(None, produce))
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
