"""Faults under load: Redis killed while requests are running, then restarted."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from redis_helpers import RedisProcess  # noqa: E402
from serve_helpers import ThreadServer, tiny_app  # noqa: E402

MODEL = "tiny-random"


def _ask(url: str, text: str) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "What colour is it?"}], "max_tokens": 6,
        "documents": [{"title": "Lamp", "text": text}]})
    assert r.status_code == 200, r.text
    body = r.json()
    return {"text": body["choices"][0]["message"]["content"], "cached": body["usage"]["prompt_tokens_details"][
        "cached_tokens"], "encoded": body["blockrag"]["encoded_tokens"]}


def test_redis_killed_mid_load_then_restarted(caplog):
    texts = [f"Lamp {i} of batch {uuid.uuid4().hex[:6]} is green." for i in range(24)]
    with RedisProcess() as redis_server:
        url = f"{redis_server.url}?prefix=fault-{uuid.uuid4().hex[:8]}:"
        # a reference answer for every document, from a server that has no shared store at all
        with ThreadServer(tiny_app()) as plain:
            expected = {t: _ask(plain.url, t)["text"] for t in texts}
        with caplog.at_level(logging.WARNING, logger="blockrag.store"), \
                ThreadServer(tiny_app(store=url)) as one, ThreadServer(tiny_app(store=url)) as two:
            results: list[tuple[str, dict]] = []
            failures: list[BaseException] = []

            def client(chunk: list[str], server_url: str) -> None:
                try:
                    for t in chunk:
                        results.append((t, _ask(server_url, t)))
                except BaseException as e:  # noqa: BLE001 - re-raised by the test below
                    failures.append(e)

            threads = [threading.Thread(target=client, args=(texts[:12], one.url)),
                       threading.Thread(target=client, args=(texts[12:], two.url))]
            for t in threads:
                t.start()
            while len(results) < 6 and not failures:
                threading.Event().wait(0.02)
            redis_server.kill()  # mid-load
            for t in threads:
                t.join(timeout=120)
            assert not failures and len(results) == 24
            assert all(got["text"] == expected[t] for t, got in results)  # nothing wrong served, before or after
            assert "unavailable" in caplog.text

            # while Redis is down, a document one server encoded is a miss for the other: recomputed, same answer
            fresh = f"Lamp while down {uuid.uuid4().hex[:6]} is red."
            assert _ask(one.url, fresh)["encoded"] > 0
            down = _ask(two.url, fresh)
            assert down["encoded"] > 0

            redis_server.start()  # same port, empty
            threading.Event().wait(1.2)  # past the store's retry interval
            after = f"Lamp after restart {uuid.uuid4().hex[:6]} is blue."
            first = _ask(one.url, after)
            assert first["encoded"] > 0
            hit = _ask(two.url, after)  # shared hits resume: encoded by one, read from Redis by two
            assert hit["encoded"] == 0 and hit["cached"] > 0 and hit["text"] == first["text"]
            assert "reachable again" in caplog.text
