"""``blockrag serve --workers 2`` over one real Redis: a block one worker encoded is a cache hit for the other,
and a worker killed with SIGKILL leaves the other serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
redis = pytest.importorskip("redis")

from redis_helpers import RedisProcess  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

MODEL = "tiny-random"


def _request(text: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "What does it say?"}], "max_tokens": 4,
            "documents": [{"title": "Note", "text": text}]}


async def _round(url: str, text: str, n: int = 4) -> list[tuple[int, int, int]]:
    """n concurrent requests on fresh connections: (worker pid, cached tokens, encoded tokens) each."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        responses = await asyncio.gather(*[http.post("/v1/chat/completions", json=_request(text)) for _ in range(n)])
    out = []
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        out.append((int(r.headers["x-blockrag-worker"]), body["usage"]["prompt_tokens_details"]["cached_tokens"],
                    body["blockrag"]["encoded_tokens"]))
    return out


def test_two_workers_share_blocks_through_redis_and_survive_sigkill(tmp_path):
    prefix = f"workers-{uuid.uuid4().hex[:8]}:"
    with RedisProcess() as server, ServeProcess("--model", MODEL, "--workers", "2", "--store",
                                                f"{server.url}?prefix={prefix}",
                                                log_path=tmp_path / "serve.log") as serve:
        readers: list[tuple[int, int, int]] = []
        seen: set[int] = set()
        for i in range(12):
            text = f"Fact number {i}: the {uuid.uuid4().hex[:6]} lamp is green."
            [(encoder, _, encoded)] = asyncio.run(_round(serve.url, text, n=1))
            assert encoded > 0  # a fresh document: encoded by the worker that got it, and stored in Redis
            rows = asyncio.run(_round(serve.url, text, n=4))
            seen |= {encoder} | {pid for pid, _, _ in rows}
            others = [row for row in rows if row[0] != encoder]
            # another worker never saw this document, yet every token of it was cached: read from Redis
            assert all(encoded == 0 and cached > 0 for _, cached, encoded in others), others
            readers += others
            if readers:
                break
        assert readers, f"no request reached a second worker; workers seen: {seen}"
        reader = readers[0][0]
        client = redis.Redis.from_url(server.url)
        assert any(True for _ in client.scan_iter(match=prefix + "*"))  # the blocks really are in Redis
        client.close()

        victim = reader
        assert victim in serve.worker_pids()
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.5)
        answered = []
        for i in range(10):
            r = httpx.post(serve.url + "/v1/chat/completions", json=_request(f"after the kill {i}"), timeout=60)
            assert r.status_code == 200, r.text
            answered.append(int(r.headers["x-blockrag-worker"]))
        assert victim not in answered
        assert httpx.get(serve.url + "/health", timeout=10).json()["status"] == "ok"


@pytest.mark.slow
def test_worker_sigkill_under_load_keeps_the_knowledge_base_consistent(tmp_path):
    """Two workers over one knowledge base (request documents written through to its disk store); one is
    SIGKILLed while 6 clients keep sending: the rest are answered, and the knowledge base verifies clean."""
    import threading

    from kb_helpers import embedder

    from blockrag.cli import load_engine
    from blockrag.index import Document, KnowledgeBase

    kb_path = tmp_path / "kb"
    engine = load_engine(MODEL, quiet=True)
    facts = [Document(f"Item {i} of the inventory is a {c} chair with {i + 3} legs.", title=f"Item {i}", id=f"i{i}")
             for i, c in enumerate(["red", "blue", "green", "grey", "white", "black"])]
    with KnowledgeBase.create(kb_path, engine, embedder(), model_name=MODEL, chunk_tokens=64, chunk_overlap=8) as kb:
        kb.add_documents(facts)
    with ServeProcess("--kb", str(kb_path), "--workers", "2", log_path=tmp_path / "serve.log") as serve:
        results: list[tuple[float, int | str, int | None]] = []
        stop = threading.Event()

        def client(index: int) -> None:
            with httpx.Client(base_url=serve.url, timeout=60) as http:
                for i in range(40):
                    if stop.is_set():
                        return
                    body = {"model": MODEL, "max_tokens": 4,
                            "messages": [{"role": "user", "content": f"Which chair has {i % 6 + 3} legs?"}]}
                    if i % 2:
                        body["rag"] = {"k": 2}
                    else:
                        body["documents"] = [{"text": f"Client {index} note {i}: the lamp is on."}]
                    try:
                        r = http.post("/v1/chat/completions", json=body)
                        results.append((time.monotonic(), r.status_code, int(r.headers["x-blockrag-worker"])))
                    except httpx.HTTPError as e:
                        results.append((time.monotonic(), type(e).__name__, None))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        while len(results) < 30:
            time.sleep(0.05)
        pids = sorted({pid for _, status, pid in results if status == 200})
        victim = pids[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(timeout=300)
        stop.set()
        after = [(status, pid) for t, status, pid in results if t > killed_at + 1.0]
        failed_in_flight = [s for t, s, _ in results if t > killed_at and s != 200]
        assert len(failed_in_flight) <= 6  # at most the requests the killed worker was holding
        assert after and all(status == 200 for status, _ in after)
        assert victim not in {pid for _, pid in after}
    with KnowledgeBase.open(kb_path) as kb:
        report = kb.verify(deep=True)
    assert report["ok"], report
