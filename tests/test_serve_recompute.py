"""`recompute` through the server: the engine's selective recompute, named as in the CLI and integrations.

A request with ``recompute`` answers as ``engine.generate`` with the same selection (greedy, same documents), reports
the re-encoded tokens, and differs from plain block mode in what it prefilled; bad selections, and recompute with
``mode: "full"``, are 400s that name the field.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_helpers import DOCS, ThreadServer, tiny_app  # noqa: E402

from blockrag import BlockEngine, Passage  # noqa: E402

QUESTION = "Where is the river?"


@pytest.fixture(scope="module")
def server():
    with ThreadServer(tiny_app(max_tokens=16)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _ask(client, **extra):
    return client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=8, extra_body={"documents": DOCS, **extra})


def test_recompute_answers_as_the_engine_does_and_reports_recomputed_tokens(server, client):
    served = server.app.state.service.engine
    engine = BlockEngine(served.model, served.tokenizer, template="chat")
    passages = [Passage(d["text"], d["title"]) for d in DOCS]
    expected = engine.generate(passages, QUESTION, max_new_tokens=8, recompute="recommended")
    recovered = _ask(client, recompute="recommended")
    plain = _ask(client)
    timing, plain_timing = recovered.model_extra["blockrag"], plain.model_extra["blockrag"]
    assert recovered.choices[0].message.content == expected.text
    assert timing["recomputed_tokens"] == expected.usage.recomputed_tokens > 0
    assert plain_timing["recomputed_tokens"] == 0  # control: plain block mode re-encodes nothing
    assert timing["prefilled_tokens"] == plain_timing["prefilled_tokens"] + timing["recomputed_tokens"]


@pytest.mark.parametrize("extra, fragment", [({"recompute": "everything"}, "'recommended'"),
                                             ({"recompute": 3}, "recompute"),
                                             ({"recompute": "first:4", "mode": "full"}, "mode 'block'")])
def test_bad_recompute_is_a_400_naming_the_field(client, extra, fragment):
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and fragment in error["message"] and error["param"] == "recompute"


def test_a_conversation_with_recompute_is_laid_out_folded(client):
    messages = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=4,
                                           extra_body={"documents": DOCS})
    recovered = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=4,
                                               extra_body={"documents": DOCS, "recompute": "first:2"})
    assert plain.model_extra["blockrag"]["layout"] == "turns"
    assert recovered.model_extra["blockrag"]["layout"] == "folded"
    assert recovered.model_extra["blockrag"]["recomputed_tokens"] > 0
