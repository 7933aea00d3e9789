"""Two knowledge bases open on one BlockEngine: each KB's KV directory holds exactly the blocks its own docstore
needs, whatever the other one asks, encodes or deletes; gc and verify of one never cost the other a block."""

from __future__ import annotations

import pytest
from kb_helpers import embedder, torch_threads

from blockrag.index import Document, KnowledgeBase
from blockrag.index.maintenance import BlockCensus

GEN = dict(max_new_tokens=4)
SHARED = Document("Barges carry grain down the slow river every autumn.", id="shared", title="Barges")
OTTER = Document("Otters live by rivers and eat fish they catch at dusk.", id="otter", title="Otter")
MOSS = Document("Moss grows on the north side of old oak trees.", id="moss", title="Moss")
HOLTS = Document("Otters rest in dens called holts dug into river banks.", id="holts", title="Holts")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def files(kb: KnowledgeBase) -> set[str]:
    return set(kb.kv.keys())


def needed(kb: KnowledgeBase) -> set[str]:
    return set(BlockCensus.of(kb.docstore).needed)


def assert_exactly_what_it_needs(*kbs: KnowledgeBase) -> None:
    for kb in kbs:
        extra, missing = files(kb) - needed(kb), needed(kb) - files(kb)
        assert not extra and not missing, f"{kb}: {len(extra)} KV files it does not need, {len(missing)} missing"


@pytest.fixture
def two_kbs(tmp_path, make_engine):
    """(engine, kb_a, kb_b): A holds shared + otter, B shared + moss; both created on the one engine."""
    engine = make_engine("llama")
    a = KnowledgeBase.create(tmp_path / "a", engine, embedder(), chunk_tokens=64, chunk_overlap=8)
    b = KnowledgeBase.create(tmp_path / "b", engine, embedder(), chunk_tokens=64, chunk_overlap=8)
    a.add_documents([SHARED, OTTER])
    b.add_documents([SHARED, MOSS])
    with a, b:
        yield engine, a, b


def test_asking_one_kb_writes_nothing_into_the_other(two_kbs):
    engine, a, b = two_kbs
    assert_exactly_what_it_needs(a, b)  # ingest writes into its own directory only
    for kb in (a, b):  # every passage of each KB, block 0 included, from its disk
        answer = kb.ask("Where do otters and moss live?", k=2, **GEN)
        assert answer.usage.encoded_tokens == 0 and answer.usage.cached_tokens > 0
    # NOTE: B's moss block is read from B's disk through A's (a miss there): it must not be promoted into A.
    assert_exactly_what_it_needs(a, b)
    free = engine.generate(["A passage that no knowledge base holds."], "What does it say?", **GEN)
    assert free.usage.encoded_tokens > 0
    passage = free.prefill.blocks[1]  # after block 0 (which both KBs pin)
    assert not passage.cached and not any(kb.kv.contains(passage.key) for kb in (a, b))
    assert_exactly_what_it_needs(a, b)
    for kb in (a, b):
        report = kb.verify(deep=True)
        assert report["ok"] and report["orphan_blocks"] == [] and report["missing_blocks"] == []
        assert kb.gc()["blocks_deleted"] == 0


def test_deleting_a_shared_document_in_one_kb_keeps_the_others_block(two_kbs):
    _, a, b = two_kbs
    for kb in (a, b):
        kb.ask("What do barges carry?", k=2, **GEN)
    shared_key = next(h.block_key for h in a.search("barges carry grain", 2) if h.doc_id == "shared")
    assert b.delete_documents(["shared"])["blocks_deleted"] == 1
    assert not b.kv.contains(shared_key) and a.kv.contains(shared_key)  # A still needs it
    b.add_documents([HOLTS])  # an ingest in B after the delete (its commits collect replaced blocks too)
    assert_exactly_what_it_needs(a, b)
    for kb in (a, b):
        assert kb.verify(deep=True)["ok"] and kb.gc()["blocks_deleted"] == 0
    assert_exactly_what_it_needs(a, b)
    answer = a.ask("What do barges carry?", k=2, **GEN)  # A answers from its own, untouched blocks
    assert "shared" in {h.doc_id for h in answer.sources}
    assert answer.usage.encoded_tokens == 0 and answer.usage.cached_tokens == sum(
        len(block.token_ids) for block in answer.generation.prefill.blocks)


def test_a_block_both_need_is_rewritten_into_each_that_lost_it(two_kbs, make_engine, tmp_path):
    _, a, b = two_kbs
    shared_key = next(h.block_key for h in a.search("barges carry grain", 2) if h.doc_id == "shared")
    for kb in (a, b):
        kb.kv.delete(shared_key)  # a lost file (the engine's memory store does not hold it yet)
        assert kb.verify()["missing_blocks"] == [shared_key]
    answer = a.ask("What do barges carry?", k=2, **GEN)
    assert answer.usage.encoded_tokens > 0  # encoded once, written through to every KB that needs it
    assert_exactly_what_it_needs(a, b)
    assert all(kb.verify(deep=True)["ok"] for kb in (a, b))


def test_closing_one_kb_leaves_the_other_attached_and_whole(two_kbs):
    engine, a, b = two_kbs
    a.close()
    answer = b.ask("Where does moss grow?", k=2, **GEN)
    assert answer.usage.encoded_tokens == 0
    engine.generate(["Another passage no knowledge base holds."], "Why?", **GEN)
    assert_exactly_what_it_needs(b)
    with KnowledgeBase.open(a.path) as reopened:  # no engine: maintenance only
        assert reopened.verify(deep=True)["ok"] and reopened.verify()["orphan_blocks"] == []
