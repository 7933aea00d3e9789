"""A client that gives up on a JSON (non-streaming) request stops its generation, and its slot is free at once.

A forward hook on the served model counts what the server computes: decode steps (one-token forward passes)
and prompt passes (prefills and block encodings); it also slows each decode step to a few milliseconds, so a
generation of max_tokens takes seconds on any machine and "stopped early" does not depend on its speed.
Negative control: the same request left to finish runs all
the way to max_tokens.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import DOCS, ThreadServer, tiny_app  # noqa: E402

MODEL = "tiny-random"
MAX_TOKENS = 500
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": MAX_TOKENS, "documents": DOCS}


class ForwardCounter:
    """Counts the model's forward passes: ``decode`` one-token steps (each delayed by ``step_s``), ``prompt``
    longer passes."""

    def __init__(self, model, step_s: float) -> None:
        self.decode = self.prompt = 0
        self.step_s = step_s
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[-1] == 1:
            self.decode += 1
            time.sleep(self.step_s)
        else:
            self.prompt += 1

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def server():
    with ThreadServer(tiny_app(max_tokens=MAX_TOKENS)) as s:
        yield s


@pytest.fixture(scope="module")
def forwards(server):
    counter = ForwardCounter(server.app.state.service.engine.model, step_s=0.004)
    yield counter
    counter.remove()


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def wait_for(condition, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def send_and_keep_open(server, body: dict) -> socket.socket:
    """A raw HTTP/1.1 request whose response is never read; the caller closes the socket to give up."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    return sock


def wait_until_idle(server, disconnects: int) -> None:
    wait_for(lambda: (lambda h: h["active"] == 0 and h["waiting"] == 0
                      and h["counters"]["disconnects"] == disconnects)(health(server)),
             f"a free slot and {disconnects} disconnects")


def test_negative_control_the_request_left_alone_runs_to_max_tokens(server, forwards):
    before = forwards.decode
    r = httpx.post(server.url + "/v1/chat/completions", json=BODY, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
    assert forwards.decode - before == MAX_TOKENS - 1  # the last token is picked, never fed back


def test_closing_the_connection_stops_the_generation_and_frees_the_slot(server, forwards):
    disconnects = health(server)["counters"]["disconnects"]
    before = forwards.decode
    sock = send_and_keep_open(server, BODY)
    wait_for(lambda: forwards.decode - before >= 5, "decoding to start")
    sock.close()
    wait_until_idle(server, disconnects + 1)
    steps = forwards.decode - before
    time.sleep(0.3)
    assert forwards.decode - before == steps  # stopped, not decoding on in the background
    assert steps < MAX_TOKENS // 10, steps
    start = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", json={**BODY, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and time.monotonic() - start < 5


def test_an_openai_client_that_times_out_stops_the_generation(server, forwards):
    disconnects = health(server)["counters"]["disconnects"]
    before = forwards.decode
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, messages=BODY["messages"], max_tokens=MAX_TOKENS,
                                       extra_body={"documents": DOCS})
    wait_until_idle(server, disconnects + 1)
    assert forwards.decode - before < MAX_TOKENS // 2, forwards.decode - before


def test_a_client_that_leaves_while_queued_costs_nothing(server, forwards):
    disconnects = health(server)["counters"]["disconnects"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as busy:
            decoding = forwards.decode
            lines = busy.iter_lines()  # NOTE: kept: a dropped line iterator closes the response
            assert next(lines).startswith("data: ")
            wait_for(lambda: forwards.decode > decoding, "the stream holding the slot to decode")
            sock = send_and_keep_open(server, BODY)
            wait_for(lambda: health(server)["waiting"] == 1, "the request to queue")
            sock.close()
            time.sleep(0.1)  # the server sees the socket close
            prompts = forwards.prompt
    wait_until_idle(server, disconnects + 2)  # the stream's client left too
    assert forwards.prompt == prompts  # the queued request never prefilled
