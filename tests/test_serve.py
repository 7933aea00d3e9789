"""The OpenAI-compatible server, driven by the official openai client and raw HTTP against a real uvicorn."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import DOCS, ThreadServer, tiny_app  # noqa: E402

MODEL = "tiny-random"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with ThreadServer(tiny_app(max_documents=4, max_body_bytes="64K", max_tokens=1000)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _docs(tag: str) -> list[dict]:
    """Documents no other test sends (so the first request is a cache miss)."""
    return [{"title": d["title"], "text": f"{d['text']} ({tag})"} for d in DOCS]


def test_sync_completion_caches_documents(client):
    docs = _docs("sync")
    first = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, extra_body={"documents": docs})
    assert first.object == "chat.completion" and first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens <= 8
    extra = first.model_extra
    assert [s["title"] for s in extra["sources"]] == ["Paris", "Rotary embeddings"]
    assert [s["cached"] for s in extra["sources"]] == [False, False]
    assert extra["blockrag"]["encoded_tokens"] > 0
    again = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, extra_body={"documents": docs})
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert [s["cached"] for s in again.model_extra["sources"]] == [True, True]
    assert again.model_extra["blockrag"]["encoded_tokens"] == 0
    assert cached == first.usage.prompt_tokens - first.model_extra["blockrag"]["prefilled_tokens"]
    assert again.choices[0].message.content == first.choices[0].message.content  # greedy: same answer from cache
    full = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                          extra_body={"documents": docs, "mode": "full"})
    assert full.usage.prompt_tokens_details.cached_tokens == 0
    assert full.usage.prompt_tokens == first.usage.prompt_tokens
    assert full.model_extra["blockrag"]["prefilled_tokens"] == full.usage.prompt_tokens


def test_stream_matches_non_stream(client):
    docs = _docs("stream")
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, extra_body={"documents": docs})
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"documents": docs}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_async_client_concurrent(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        docs = _docs("async")
        calls = [client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6,
                                                extra_body={"documents": docs}) for _ in range(4)]
        results = await asyncio.gather(*calls)
        stream = await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, stream=True,
                                                      extra_body={"documents": docs})
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return results, streamed

    results, streamed = asyncio.run(main())
    assert len({r.choices[0].message.content for r in results}) == 1
    assert streamed == results[0].choices[0].message.content
    assert sum(r.usage.prompt_tokens_details.cached_tokens > 0 for r in results) >= 3  # one encodes, the rest hit


def test_models_health_and_page(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL, "blockrag"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["knowledge_base"] is False
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text


def test_system_message_and_stop(client):
    docs = _docs("system")
    base = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, extra_body={"documents": docs})
    other = client.chat.completions.create(model=MODEL, max_tokens=10, extra_body={"documents": docs},
                                           messages=[{"role": "system", "content": "Answer in French."}, *ASK])
    assert other.usage.prompt_tokens != base.usage.prompt_tokens  # the instruction is block 0
    text = base.choices[0].message.content
    if len(text) > 2:
        stop = text[len(text) // 2:len(text) // 2 + 1]
        cut = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, stop=[stop],
                                             extra_body={"documents": docs})
        assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"


# --- bad input --------------------------------------------------------------------------------------

BAD = [
    ("malformed json", b'{"model": "tiny-random", "messages": [', 400, "invalid_json"),
    ("not an object", b'[1, 2]', 400, "invalid_json"),
    ("non-utf8", b'{"model": "tiny-random", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400,
     "invalid_encoding"),
    ("empty body", b"", 400, "invalid_json"),
    ("empty messages", {"model": MODEL, "messages": []}, 400, "invalid_value"),
    ("missing messages", {"model": MODEL}, 400, "missing_required_parameter"),
    ("messages wrong type", {"model": MODEL, "messages": "hi"}, 400, "invalid_type"),
    ("content wrong type", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    ("bad role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ("last not user", {"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value"),
    ("unknown model", {"model": "gpt-17", "messages": ASK}, 404, "model_not_found"),
    ("model wrong type", {"model": 3, "messages": ASK}, 400, "invalid_type"),
    ("negative max_tokens", {"model": MODEL, "messages": ASK, "max_tokens": -5}, 400, "invalid_value"),
    ("max_tokens over limit", {"model": MODEL, "messages": ASK, "max_tokens": 5000}, 400, "invalid_value"),
    ("max_tokens string", {"model": MODEL, "messages": ASK, "max_tokens": "8"}, 400, "invalid_type"),
    ("max_tokens bool", {"model": MODEL, "messages": ASK, "max_tokens": True}, 400, "invalid_type"),
    ("temperature range", {"model": MODEL, "messages": ASK, "temperature": 7}, 400, "invalid_value"),
    ("stream wrong type", {"model": MODEL, "messages": ASK, "stream": "yes"}, 400, "invalid_type"),
    ("stop wrong type", {"model": MODEL, "messages": ASK, "stop": 3}, 400, "invalid_type"),
    ("n > 1", {"model": MODEL, "messages": ASK, "n": 2}, 400, "invalid_value"),
    ("bad mode", {"model": MODEL, "messages": ASK, "mode": "turbo"}, 400, "invalid_value"),
    ("too many documents", {"model": MODEL, "messages": ASK, "documents": DOCS * 3}, 400, "too_many_documents"),
    ("document wrong type", {"model": MODEL, "messages": ASK, "documents": [{"text": 1}]}, 400, "invalid_type"),
    ("empty document", {"model": MODEL, "messages": ASK, "documents": [{"text": "  "}]}, 400, "invalid_value"),
    ("too many tokens", {"model": MODEL, "messages": ASK, "max_tokens": 1000,
                         "documents": [{"text": "word " * 300}]}, 400, "context_length_exceeded"),
    ("rag without kb", {"model": MODEL, "messages": ASK, "rag": {"k": 2}}, 400, "no_knowledge_base"),
    ("image content", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "invalid_type"),
]


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_4xx(server, name, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] and error["message"]
    assert "Traceback" not in r.text and "File \"" not in r.text


def test_oversized_body_is_413(server):
    body = json.dumps({"model": MODEL, "messages": ASK, "documents": [{"text": "x" * 70_000}]}).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ASK)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    assert "at least one message" in str(info.value)


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# --- auth, queue, disconnect ----------------------------------------------------------------------

def test_api_key_required():
    with ThreadServer(tiny_app(api_key="s3cret")) as s:
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices
        for key in ("wrong", None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(s.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(s.url + "/health").status_code == 200  # liveness needs no key


def _long_prompt_request(max_tokens: int) -> dict:
    return {"model": MODEL, "messages": ASK, "max_tokens": max_tokens, "documents": DOCS}


def test_bounded_queue_answers_429_with_retry_after():
    with ThreadServer(tiny_app(max_queue=1, max_tokens=1000)) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                # a long stream holds the only slot; of 4 more requests one may wait, the rest are refused
                async with http.stream("POST", "/v1/chat/completions",
                                       json={**_long_prompt_request(800), "stream": True}) as busy:
                    lines = busy.aiter_lines()
                    assert (await lines.__anext__()).startswith("data: ")
                    calls = [http.post("/v1/chat/completions", json=_long_prompt_request(4)) for _ in range(4)]
                    return await asyncio.gather(*calls)

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 429, 429, 429], codes
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"
        # the openai client honours Retry-After and retries 429: once the queue drains it gets through
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=3)
        assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices


def test_queue_timeout_answers_503_with_retry_after():
    with ThreadServer(tiny_app(queue_timeout=0.3, max_tokens=1000)) as s:
        async def main():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                async with http.stream("POST", "/v1/chat/completions",
                                       json={**_long_prompt_request(800), "stream": True}) as busy:
                    lines = busy.aiter_lines()
                    assert (await lines.__anext__()).startswith("data: ")
                    return await http.post("/v1/chat/completions", json=_long_prompt_request(2))

        r = asyncio.run(main())
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
        assert int(r.headers["retry-after"]) >= 1


def test_max_completion_tokens_is_honoured(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=3,
                                       extra_body={"documents": DOCS})
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_mid_stream_frees_the_slot(server, client):
    body = {**_long_prompt_request(800), "stream": True}
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=800, extra_body={"documents": DOCS})
    assert plain.choices[0].finish_reason == "length"  # the greedy answer runs to max_tokens: ~seconds of work
    before = httpx.get(server.url + "/health").json()["counters"]["disconnects"]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health").json()
        if health["active"] == 0 and health["counters"]["disconnects"] > before:
            break
        time.sleep(0.05)
    assert health["active"] == 0 and health["counters"]["disconnects"] == before + 1
    start = time.monotonic()
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2).choices
    assert time.monotonic() - start < 5


def test_load_benchmark_runs_bounded_with_no_errors(server):
    """The load benchmark's client loop (benchmarks/serve_load.py) on a small run: every request answered."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    start = time.monotonic()
    records = asyncio.run(bench.run_load(server.url, MODEL, clients=3, requests=4, max_tokens=4, pool=4,
                                         stream_every=2, time_limit_s=60))
    summary = bench.summarize(records, time.monotonic() - start)
    assert summary["requests"] == 12 and summary["errors"] == 0, summary
    assert summary["cached_token_share"] > 0 and summary["latency_p99_ms"] >= summary["latency_p50_ms"] > 0
    assert sum(r["stream"] for r in records) == 6 and all("ttft_ms" in r for r in records if r["stream"])


def test_api_key_from_environment(monkeypatch):
    import argparse

    from blockrag.serve.cli import add_parser, options_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("BLOCKRAG_API_KEY", "from-env")
    assert options_from_args(parser.parse_args(["serve"]))["api_key"] == "from-env"
    assert options_from_args(parser.parse_args(["serve", "--api-key", "flag"]))["api_key"] == "flag"
    monkeypatch.delenv("BLOCKRAG_API_KEY")
    assert options_from_args(parser.parse_args(["serve"]))["api_key"] is None


def test_the_startup_line_names_the_model_served_also_when_none_was_given(monkeypatch, capsys):
    """Without --model the server serves the default model (or the knowledge base's): the line says which."""
    import argparse

    import uvicorn

    import blockrag.models
    from blockrag.serve.cli import add_parser, run

    monkeypatch.setattr(blockrag.models, "DEFAULT_MODEL", "tiny-random")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert run(parser.parse_args(["serve", "--port", "1"])) == 0
    line = [s for s in capsys.readouterr().err.splitlines() if s.startswith("blockrag serve:")]
    assert line == ["blockrag serve: http://127.0.0.1:1/ (model tiny-random)"], line
