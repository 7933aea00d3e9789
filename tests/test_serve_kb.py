"""The server over a knowledge base: rag requests retrieve passages whose KV was stored at ingest."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kb_helpers import embedder  # noqa: E402
from serve_helpers import ThreadServer, tiny_app  # noqa: E402

MODEL = "tiny-random"
FACTS = [
    ("Zorblat", "The zorblat is a blue bird that nests only on the cliffs of Varnholm."),
    ("Quillon bridge", "The Quillon bridge was built in 1822 from grey granite and spans the river Esk."),
    ("Mellow tea", "Mellow tea is brewed from roasted barley and served cold in summer."),
]


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory):
    from blockrag.cli import load_engine
    from blockrag.index import Document, KnowledgeBase

    path = tmp_path_factory.mktemp("kb")
    engine = load_engine(MODEL, quiet=True)
    with KnowledgeBase.create(path, engine, embedder(), model_name=MODEL, chunk_tokens=64, chunk_overlap=8) as kb:
        kb.add_documents([Document(text, title=title, id=title) for title, text in FACTS])
    return path


@pytest.fixture(scope="module")
def server(kb_dir):
    with ThreadServer(tiny_app(model=None, kb=str(kb_dir))) as s:
        yield s


def test_rag_request_uses_stored_blocks(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL, max_tokens=6, extra_body={"rag": {"k": 2}},
                                       messages=[{"role": "user", "content": "Where does the zorblat nest?"}])
    sources = r.model_extra["sources"]
    assert len(sources) == 2 and sources[0]["title"] == "Zorblat" and sources[0]["score"] >= sources[1]["score"]
    assert all(s["cached"] for s in sources)  # encoded at ingest, read from the knowledge base's store
    passage_tokens = r.usage.prompt_tokens - r.model_extra["blockrag"]["prefilled_tokens"]
    assert r.usage.prompt_tokens_details.cached_tokens == passage_tokens > 0
    assert httpx.get(server.url + "/health").json()["knowledge_base"] is True


def test_kb_search_endpoint(server):
    got = httpx.get(server.url + "/v1/kb/search", params={"query": "granite bridge", "k": 1}).json()["data"]
    assert [h["title"] for h in got] == ["Quillon bridge"] and got[0]["block_key"]
    posted = httpx.post(server.url + "/v1/kb/search", json={"query": "barley tea", "k": 3}).json()["data"]
    assert posted[0]["title"] == "Mellow tea" and len(posted) == 3
    for params in ({"query": "", "k": 1}, {"query": "x", "k": 0}, {"query": "x", "k": "many"}):
        r = httpx.get(server.url + "/v1/kb/search", params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("query", "k")


def test_rag_k_validated(server):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "rag": {"k": 0}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rag.k"


def test_search_without_kb_is_404():
    with ThreadServer(tiny_app()) as s:
        r = httpx.get(s.url + "/v1/kb/search", params={"query": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_knowledge_base"
