"""blockrag.aio: blocking streams consumed from asyncio."""

import asyncio
import threading

import pytest

from blockrag.aio import iterate_in_thread


def test_items_errors_and_early_close():
    closed_on = []

    def numbers():
        try:
            yield from range(100)
        finally:
            closed_on.append(threading.current_thread().name)

    async def take(n):
        out = []
        agen = iterate_in_thread(numbers)
        async for item in agen:
            out.append(item)
            if len(out) == n:
                break
        await agen.aclose()
        return out

    assert asyncio.run(take(5)) == [0, 1, 2, 3, 4]
    assert closed_on and closed_on[0] != threading.main_thread().name  # closed on the worker thread

    def failing():
        yield 1
        raise ValueError("boom")

    async def drain():
        return [x async for x in iterate_in_thread(failing)]

    with pytest.raises(ValueError, match="boom"):
        asyncio.run(drain())


def test_engine_stream_through_asyncio(make_engine):
    engine = make_engine("llama")
    expected = engine.generate(["Paris is the capital of France."], "Capital?", max_new_tokens=10).text

    async def run():
        stream = lambda: iter(engine.stream(["Paris is the capital of France."], "Capital?", max_new_tokens=10))  # noqa: E731
        return "".join([d async for d in iterate_in_thread(stream)])

    assert asyncio.run(run()) == expected
