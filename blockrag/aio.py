"""Async iteration of the engine's blocking streams, for frameworks with async APIs (stdlib only)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

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

    # NOTE: the context copy carries the caller's context variables (tracing spans, callbacks) along.
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
