"""KnowledgeBase with a tiny random LLM and the real MiniLM embedder: retrieval, cached answers, upserts,
model changes, damaged KV files, concurrent readers and a writer, full disks, bad inputs."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import threading
import time

import pytest
import torch
from kb_helpers import CHUNK_OVERLAP, CHUNK_TOKENS, CORPUS, embedder, questions, torch_threads

from blockrag import BlockEngine, InvalidInputError, KVBlockMismatchError
from blockrag import atomic as atomic_module
from blockrag.index import (
    Document,
    DocumentError,
    EmbedderMismatchError,
    EmptyKnowledgeBaseError,
    KnowledgeBase,
    KnowledgeBaseError,
    KnowledgeBaseLockedError,
    NotAKnowledgeBaseError,
    SearchHit,
)
from blockrag.store import CorruptBlockError, StoreWriteError
from blockrag.store.disk import encode_block
from blockrag.testing import tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield

GEN = dict(max_new_tokens=4)


@pytest.fixture(scope="module")
def model_b(tokenizer):
    """Same architecture and tokenizer as make_model('llama'), other weights: another fingerprint."""
    return tiny_model("llama", vocab_size=len(tokenizer), seed=1)


def new_kb(path, make_engine, **kwargs) -> KnowledgeBase:
    kwargs.setdefault("chunk_tokens", CHUNK_TOKENS)
    kwargs.setdefault("chunk_overlap", CHUNK_OVERLAP)
    return KnowledgeBase.create(path, make_engine("llama"), embedder(), **kwargs)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, make_engine):
    path = tmp_path_factory.mktemp("corpus") / "kb"
    with new_kb(path, make_engine) as kb:
        report = kb.add_paths([CORPUS])
        assert report.documents_added == 11 and report.warnings == []
    return path


@pytest.fixture
def corpus_kb(corpus_dir, make_engine):
    with KnowledgeBase.open(corpus_dir, make_engine("llama"), embedder()) as kb:
        yield kb


def copy_kb(src, dst):
    shutil.copytree(src, dst)
    return dst


# --- retrieval and answers -----------------------------------------------------------------------

def test_each_question_retrieves_its_answer_passage_first(corpus_kb):
    assert corpus_kb.stats()["passages"] > 11  # documents were split into several passages
    for q in questions():
        hits = corpus_kb.search(q["question"], k=3)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        top = hits[0]
        assert top.doc_id == q["doc_id"] and q["answer"] in top.text, (q, top)
        assert isinstance(top, SearchHit) and top.score > hits[1].score
        json.dumps(top.to_dict())  # JSON-safe
    with pytest.raises(dataclasses.FrozenInstanceError):
        top.score = 1.0


def test_answers_use_stored_blocks_and_match_the_engine(corpus_kb):
    question = questions()[0]["question"]
    engine = corpus_kb.engine
    answer = corpus_kb.ask(question, k=3, **GEN)
    assert [h.passage_id for h in answer.sources] == [h.passage_id for h in corpus_kb.search(question, 3)]
    blocks = [b for b in answer.generation.prefill.blocks]
    assert len(blocks) == 4 and all(b.cached for b in blocks)  # instruction block + 3 passages, all from disk
    assert answer.usage.encoded_tokens == 0
    assert answer.usage.cached_tokens == sum(len(b.token_ids) for b in blocks)
    assert [b.key for b in blocks[1:]] == [h.block_key for h in answer.sources]
    assert [len(b.token_ids) for b in blocks[1:]] == [h.token_count for h in answer.sources]
    # The same prompt through the engine directly, from the KB's blocks: identical logits and text.
    kv = corpus_kb.blocks_for(answer.sources)
    assert all(b.fingerprint == engine.fingerprint for b in kv)
    direct = engine.generate(kv, question, **GEN)
    torch.testing.assert_close(direct.prefill.logits, answer.generation.prefill.logits, atol=0, rtol=0)
    assert direct.text == answer.text
    sources, stream = corpus_kb.stream(question, k=3, **GEN)
    assert "".join(stream) == answer.text and stream.result.usage.encoded_tokens == 0
    assert [h.passage_id for h in sources] == [h.passage_id for h in answer.sources]
    full = corpus_kb.ask(question, k=3, mode="full", **GEN)
    assert full.usage.cached_tokens == 0 and full.usage.prefilled_tokens == len(full.generation.prefill.input_ids)


def test_reopened_kb_with_a_fresh_engine_encodes_nothing(corpus_dir, make_engine):
    engine = make_engine("llama")
    own_store = engine.store
    assert len(own_store) == 0
    with KnowledgeBase.open(corpus_dir, engine) as kb:  # embedder from the manifest
        assert kb.embedder.id == "sentence-transformers/all-MiniLM-L6-v2"
        answer = kb.ask(questions()[1]["question"], k=2, **GEN)
        assert answer.usage.encoded_tokens == 0 and answer.usage.cached_tokens > 0
    assert engine.store is own_store  # closing gives the engine its store back


def test_k_larger_than_the_corpus_returns_every_passage(corpus_kb):
    n = corpus_kb.stats()["passages"]
    hits = corpus_kb.search("anything at all", k=n + 50)
    assert len(hits) == n and len({h.passage_id for h in hits}) == n


def test_stats_are_json_safe_and_complete(corpus_kb):
    stats = json.loads(json.dumps(corpus_kb.stats()))
    assert stats["documents"] == 11 and stats["vectors"] == stats["passages"]
    assert stats["kv_blocks"] == stats["distinct_blocks"] + 1  # + the instruction block
    assert stats["orphan_blocks"] == 0 and stats["blocks_missing"] == 0 and stats["kv_bytes"] > 0
    assert stats["embedder"] == {"id": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384}
    assert stats["model"]["fingerprint"] == corpus_kb.engine.fingerprint
    assert stats["kv_dtype"] == "float32" and stats["kv_fp8"] is False
    # KV per token, from the file sizes, against the model's shape: K and V per layer, KV heads x head size, fp32
    config = corpus_kb.engine.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    raw = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    per_token, per_passage = stats["kv_bytes_per_token"], stats["kv_bytes_per_passage"]
    assert raw <= per_token <= 1.25 * raw + 16, (per_token, raw)  # + token ids and a header per file
    assert per_passage == pytest.approx(per_token * stats["passage_tokens"] / stats["passages"], rel=0.05)
    assert stats["models"][0]["kv_bytes"] < stats["kv_bytes"]  # the instruction block is not a passage
    assert corpus_kb.verify(deep=True)["ok"]


# --- updates ---------------------------------------------------------------------------------------

def test_upsert_dedupe_and_delete(tmp_path, make_engine):
    shared = "Shared paragraph that appears in two documents, word for word, about river barges."
    with new_kb(tmp_path / "kb", make_engine) as kb:
        first = kb.add_documents([Document("Otters live by rivers and eat fish.", id="otter", title="Otter"),
                                  Document(shared, id="a", title="Barges"), Document(shared, id="b", title="Barges")])
        assert (first.documents_added, first.documents_skipped) == (2, 1)
        assert "same content as document 'a'" in first.warnings[0]
        again = kb.add_documents([Document("Otters live by rivers and eat fish.", id="otter", title="Otter")])
        assert (again.documents_skipped, again.documents_added, again.blocks_encoded) == (1, 0, 0)
        same_text = kb.add_documents([Document(shared, id="c", title="Barges 2")])  # other title: other content
        assert same_text.documents_added == 1
        old_key = kb.search("otters eat fish", 1)[0].block_key
        assert kb.kv.contains(old_key)
        update = kb.add_documents([Document("Otters are playful and build dens called holts.", id="otter",
                                            title="Otter")])
        assert (update.documents_updated, update.passages_removed, update.passages_added) == (1, 1, 1)
        assert not kb.kv.contains(old_key)  # no passage references the old block any more
        hit = kb.search("where do otters sleep", 1)[0]
        assert hit.doc_id == "otter" and "holts" in hit.text
        result = kb.delete_documents(["otter", "no-such-doc"])
        assert result == {"documents_deleted": 1, "passages_removed": 1, "blocks_deleted": 1,
                          "not_found": ["no-such-doc"]}
        assert all(h.doc_id != "otter" for h in kb.search("otters", 10))
        assert kb.stats()["documents"] == 2 and kb.verify(deep=True)["ok"]


def test_documents_sharing_a_passage_share_its_kv_file(tmp_path, make_engine):
    with new_kb(tmp_path / "kb", make_engine) as kb:
        report = kb.add_documents([Document("Identical text.", id="x"), Document("Identical text.", id="y")])
        # explicit ids: both kept, one KV file
        assert report.documents_added == 1 and report.documents_skipped == 1
        report = kb.add_documents([Document("Identical text.", id="z", metadata={"v": 2}, title=None)])
        assert report.documents_skipped == 1  # same content hash (title and text) as x
        kb.add_documents([Document("Identical text.", id="w", title="T")])
        assert kb.stats()["kv_blocks"] == 3  # instruction block, untitled and titled passage


# --- other model ---------------------------------------------------------------------------------

def test_another_model_is_refused_or_added_and_every_models_kv_is_kept(corpus_dir, tmp_path, tokenizer, model_b,
                                                                        make_engine, caplog):
    path = copy_kb(corpus_dir, tmp_path / "kb")
    engine_b = BlockEngine(model_b, tokenizer)
    with pytest.raises(KVBlockMismatchError, match="refusing to open.*on_mismatch='add'") as info:
        KnowledgeBase.open(path, engine_b, on_mismatch="refuse")
    built = KnowledgeBase.info(path)["model"]["fingerprint"]
    assert built[:12] in str(info.value) and engine_b.fingerprint[:12] in str(info.value)
    files_a = set(os.listdir(path / "kv"))
    question = questions()[2]["question"]
    with caplog.at_level(logging.WARNING, logger="blockrag.index"):
        kb = KnowledgeBase.open(path, engine_b, model_name="model-b")
    assert "adding it" in caplog.text and "the other models' KV is kept" in caplog.text
    with kb:
        first = kb.ask(question, k=2, **GEN)
        assert first.usage.encoded_tokens > 0  # nothing of model A was used
        assert all(h.block_key == engine_b.key_of(b.token_ids)
                   for h, b in zip(first.sources, first.generation.prefill.blocks[1:]))
        assert kb.ask(question, k=2, **GEN).usage.encoded_tokens == 0  # now stored for model B
        stats = kb.stats()
        assert stats["model"]["fingerprint"] == built  # the default model stays A: nothing is flipped
        assert [m["fingerprint"] for m in stats["models"]] == [built, engine_b.fingerprint]
        assert [m["name"] for m in stats["models"]][1] == "model-b"
        assert stats["models"][1]["passages"] == stats["passages"] and stats["models"][1]["blocks_stored"] >= 2
        assert stats["orphan_blocks"] == 0  # model A's KV is still known, not orphaned
        assert kb.gc()["blocks_deleted"] == 0
        assert all(b.fingerprint == engine_b.fingerprint for b in kb.blocks_for(first.sources))
        b_keys = {h.block_key for h in first.sources}
    assert files_a <= set(os.listdir(path / "kv"))  # model A's files are kept
    assert KnowledgeBase.info(path)["manifest"]["models"][1]["fingerprint"] == engine_b.fingerprint
    with KnowledgeBase.open(path, make_engine("llama")) as kb:
        assert kb.ask(question, k=2, **GEN).usage.encoded_tokens == 0  # A answers from its own blocks
        # documents added with model A get model B's keys when B opens the knowledge base again
        kb.add_documents([Document("Lichens are a partnership of a fungus and an alga.", id="lichen")])
        assert kb.verify(deep=True)["ok"]
        with pytest.raises(KnowledgeBaseError, match="expected one known model matching 'nope'"):
            kb.forget_model("nope")
    with KnowledgeBase.open(path, engine_b) as kb:
        assert kb.stats()["models"][1]["passages"] == kb.stats()["passages"]
        assert kb.forget_model(engine_b.fingerprint[:12])["name"] == "model-b"  # explicit: only now it goes
        assert kb.stats()["orphan_blocks"] >= len(b_keys)
        assert kb.gc()["blocks_deleted"] >= len(b_keys)
        assert not any(kb.kv.contains(key) for key in b_keys) and files_a <= set(os.listdir(path / "kv"))
        with pytest.raises(KnowledgeBaseError, match="only model"):
            kb.forget_model(built)
    with KnowledgeBase.open(path, make_engine("llama")) as kb:
        assert kb.ask(question, k=2, **GEN).usage.encoded_tokens == 0 and kb.verify(deep=True)["ok"]


# --- damaged KV files ------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flip", "truncate", "wrong_model"])
def test_damaged_kv_files_are_recomputed_or_refused_in_strict_mode(corpus_dir, tmp_path, make_engine, tokenizer,
                                                                   model_b, damage):
    path = copy_kb(corpus_dir, tmp_path / "kb")
    question = questions()[3]["question"]
    with KnowledgeBase.open(path, make_engine("llama")) as kb:
        reference = kb.ask(question, k=2, **GEN)
        target = reference.sources[0]
        file = kb.kv.path_of(target.block_key)
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[len(data) - 7] ^= 0x40
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        other = BlockEngine(model_b, tokenizer).encode([target.text])[0]
        forged = type(other)(keys=other.keys, values=other.values, token_ids=other.token_ids,
                             fingerprint=other.fingerprint, key=target.block_key, text=other.text)
        data = bytearray(encode_block(forged))
    file.write_bytes(bytes(data))
    error = KVBlockMismatchError if damage == "wrong_model" else CorruptBlockError
    with KnowledgeBase.open(path, make_engine("llama"), strict=True) as kb:
        with pytest.raises(error, match="strict"):
            kb.ask(question, k=2, **GEN)
    assert file.read_bytes() == bytes(data)  # strict mode leaves the file for inspection
    with KnowledgeBase.open(path, make_engine("llama")) as kb:
        answer = kb.ask(question, k=2, **GEN)
        assert answer.usage.encoded_tokens == target.token_count  # exactly the damaged block was recomputed
        torch.testing.assert_close(answer.generation.prefill.logits, reference.generation.prefill.logits,
                                   atol=1e-5, rtol=0)
        assert kb.stats()["kv_discarded"]["wrong_model" if damage == "wrong_model" else "corrupt"] == 1
        assert kb.verify(deep=True)["ok"]  # the file was rewritten
        assert kb.ask(question, k=2, **GEN).usage.encoded_tokens == 0


# --- concurrency -----------------------------------------------------------------------------------

def test_eight_readers_and_one_writer(tmp_path, make_engine):
    with new_kb(tmp_path / "kb", make_engine) as kb:
        kb.add_paths([CORPUS])
        new_docs = [Document(f"Harbour {i} of the island of Vell ships {i * 3} tonnes of kelp each winter. "
                             f"Its pier is {i * 7} metres long and was rebuilt in {1900 + i}.", id=f"harbour-{i}",
                             title=f"Harbour {i}") for i in range(12)]
        qs = [q["question"] for q in questions()] + ["How much kelp does a harbour of Vell ship?"]
        errors: list[BaseException] = []
        answers: list = []
        writing = threading.Event()
        done = threading.Event()
        during_write = [0]

        def reader(seed: int) -> None:
            i = seed
            try:
                while not done.is_set() or i < seed + 3:
                    answer = kb.ask(qs[i % len(qs)], k=3, **GEN)
                    answers.append(answer)
                    if writing.is_set() and not done.is_set():
                        during_write[0] += 1
                    i += 1
            except BaseException as e:  # noqa: B036 - collected and re-raised in the main thread
                errors.append(e)

        def writer() -> None:
            try:
                writing.set()
                for start in range(0, len(new_docs), 2):
                    kb.add_documents(new_docs[start:start + 2], batch_tokens=64)
            except BaseException as e:  # noqa: B036
                errors.append(e)
            finally:
                done.set()

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)] + [threading.Thread(target=writer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, repr(errors[0])
        assert during_write[0] > 0 and len(answers) >= 24
        for answer in answers:
            for hit in answer.sources:
                assert kb.docstore.passage(hit.passage_id) is not None
                assert kb.kv.contains(hit.block_key)
            assert answer.usage.prompt_tokens == len(answer.generation.prefill.input_ids)
        assert kb.stats()["documents"] == 11 + 12
        assert kb.search("kelp harbour pier Vell", 1)[0].doc_id.startswith("harbour-")
        assert kb.verify(deep=True)["ok"]


def test_a_second_writer_waits_for_the_lock(tmp_path, make_engine):
    path = tmp_path / "kb"
    new_kb(path, make_engine).close()
    with KnowledgeBase.open(path, make_engine("llama"), embedder()) as one, \
            KnowledgeBase.open(path, make_engine("llama"), embedder(), lock_timeout=0.3) as two:
        with one._writing():
            with pytest.raises(KnowledgeBaseLockedError, match="another process writing"):
                two.add_documents([Document("x")])
        assert two.add_documents([Document("x")]).documents_added == 1
        assert one.search("x", 1)[0].text == "x"  # the other instance's write is visible


# --- full disk -----------------------------------------------------------------------------------

def _enospc_after(limit: int, under):
    real_write = os.write
    state = {"written": 0}

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(str(under)):
            return real_write(fd, data)
        room = limit - state["written"]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[:room]))
        state["written"] += n
        return n

    return write


def test_disk_full_while_writing_kv(tmp_path, make_engine, monkeypatch):
    path = tmp_path / "kb"
    docs = [Document(f"Lake {i} is {i} kilometres long and full of pike.", id=f"lake-{i}") for i in range(6)]
    with new_kb(path, make_engine) as kb:
        kb.add_documents(docs[:2])
        monkeypatch.setattr(atomic_module.os, "write", _enospc_after(20_000, path / "kv"))
        with pytest.raises(StoreWriteError, match="no space left on device.*nothing partial") as info:
            kb.add_documents(docs[2:], batch_tokens=32)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.undo()
        check = kb.verify(deep=True)
        assert check["ok"] and check["temp_files"] == [] and check["index_extra"] == 0
        committed = kb.stats()["documents"]
        assert 2 <= committed < 6
    with KnowledgeBase.open(path, make_engine("llama")) as kb:  # still opens
        assert kb.stats()["documents"] == committed
        report = kb.add_documents(docs)  # the re-run completes
        assert report.documents_added == 6 - committed and report.documents_skipped == committed
        assert kb.verify(deep=True)["ok"] and kb.stats()["orphan_blocks"] == 0


def test_disk_full_while_saving_the_index_and_in_sqlite(tmp_path, make_engine, monkeypatch):
    path = tmp_path / "kb"
    with new_kb(path, make_engine) as kb:
        kb.add_documents([Document("Alpine meadows bloom in June.", id="m")])
        monkeypatch.setattr(atomic_module.os, "write", _enospc_after(0, path / ".tmp"))
        with pytest.raises(StoreWriteError, match="index.faiss"):
            kb.add_documents([Document("Glaciers carve valleys slowly.", id="g")])
        monkeypatch.undo()
        assert kb.verify()["index_missing"] == 1  # the saved index is behind the docstore ...
    with KnowledgeBase.open(path, make_engine("llama")) as kb:
        assert kb.search("glacier valleys", 1)[0].doc_id == "g"  # ... and is patched from it on open
        conn = kb.docstore._conn()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite reports the database full past this
        big = Document(" ".join(f"Fjord {i} is deep and cold." for i in range(300)), id="fjords")
        with pytest.raises(StoreWriteError, match="database or disk is full.*nothing of this batch"):
            kb.add_documents([big])
        conn.execute("PRAGMA max_page_count = 1073741823")
        check = kb.verify(deep=True)
        assert check["ok"] and len(check["orphan_blocks"]) > 0  # KV written before the failed commit: reported
        report = kb.add_documents([big])
        assert report.documents_added == 1 and report.blocks_reused > 0 and report.blocks_encoded == 0
        assert kb.verify()["orphan_blocks"] == []


# --- bad inputs ----------------------------------------------------------------------------------

def test_bad_inputs_have_clear_errors(tmp_path, make_engine, corpus_kb):
    with pytest.raises(NotAKnowledgeBaseError, match="found nothing"):
        KnowledgeBase.open(tmp_path / "missing", make_engine("llama"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(NotAKnowledgeBaseError, match="found a directory with 1 entries and no manifest"):
        KnowledgeBase.open(tmp_path / "plain")
    with pytest.raises(KnowledgeBaseError, match="1 other entries"):
        KnowledgeBase.create(tmp_path / "plain", make_engine("llama"), embedder())
    with pytest.raises(KnowledgeBaseError, match="already"):
        KnowledgeBase.create(corpus_kb.path, make_engine("llama"), embedder())
    for k in (0, -1, "3", True, 2.5):
        with pytest.raises(InvalidInputError, match="k to be an int"):
            corpus_kb.search("question", k)
    for question in ("", "   ", None, 42):
        with pytest.raises(InvalidInputError, match="non-empty question"):
            corpus_kb.ask(question)
    with pytest.raises(DocumentError, match="found nothing at"):
        corpus_kb.add_paths([tmp_path / "nope.txt"])
    with pytest.raises(InvalidInputError, match="single Document"):
        corpus_kb.add_documents(Document("x"))
    with pytest.raises(InvalidInputError, match="index kind"):
        KnowledgeBase.create(tmp_path / "bad-index", make_engine("llama"), embedder(), index="ivf")
    with pytest.raises(InvalidInputError, match="on_mismatch"):
        KnowledgeBase.open(corpus_kb.path, make_engine("llama"), on_mismatch="ignore")


def test_empty_kb_and_skipped_files(tmp_path, make_engine):
    with new_kb(tmp_path / "kb", make_engine) as kb:
        assert kb.search("anything", 5) == []
        with pytest.raises(EmptyKnowledgeBaseError, match="empty knowledge base.*blockrag ingest"):
            kb.ask("anything?")
        docs = tmp_path / "docs"
        docs.mkdir()
        (docs / "empty.txt").write_text("")
        (docs / "binary.txt").write_bytes(bytes(range(256)))
        (docs / "latin1.md").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
        report = kb.add_paths([docs])
        assert report.documents_added == 0 and len(report.warnings) == 3
        blank = kb.add_documents([Document("   ", id="blank")])
        assert blank.warnings == ["skipped document 'blank': its text is empty"]
        with pytest.raises(EmptyKnowledgeBaseError):
            kb.ask("anything?")


def test_long_single_line_document_is_ingested(tmp_path, make_engine):
    text = " ".join(f"Stone {i} of the causeway weighs {i % 97} kilograms." for i in range(700))  # ~33 KB
    assert "\n" not in text and len(text) > 30_000
    with new_kb(tmp_path / "kb", make_engine, chunk_tokens=256, chunk_overlap=0) as kb:
        report = kb.add_documents([Document(text, id="causeway")])
        stats = kb.stats()
        assert report.passages_added == stats["passages"] > 50
        assert max(h.token_count for h in kb.search("causeway stone", 500)) <= 256 + 16  # text + template
        assert kb.ask("How heavy is stone 3?", k=2, **GEN).usage.encoded_tokens == 0


def test_embedder_must_match_the_manifest(corpus_dir, tmp_path):
    path = copy_kb(corpus_dir, tmp_path / "kb")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["embedder"]["id"] = "sentence-transformers/all-mpnet-base-v2"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmbedderMismatchError, match="all-mpnet-base-v2.*found embedder .*all-MiniLM-L6-v2"):
        KnowledgeBase.open(path, embedder=embedder())
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(KnowledgeBaseError, match="JSON manifest"):
        KnowledgeBase.open(path)
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KnowledgeBaseError, match="format version 1, found 99"):
        KnowledgeBase.open(path)


# --- options -------------------------------------------------------------------------------------

def test_hnsw_index(tmp_path, make_engine):
    with new_kb(tmp_path / "kb", make_engine, index="hnsw") as kb:
        kb.add_paths([CORPUS])
        for q in questions()[:4]:
            assert kb.search(q["question"], 1)[0].doc_id == q["doc_id"]
        victim = questions()[0]["doc_id"]
        kb.delete_documents([victim])  # HNSW cannot remove: rebuilt from the docstore
        assert all(h.doc_id != victim for h in kb.search(questions()[0]["question"], 50))
    with KnowledgeBase.open(tmp_path / "kb", make_engine("llama")) as kb:
        assert kb.stats()["index"] == "hnsw" and kb.stats()["vectors"] == kb.stats()["passages"]


def test_fp8_kb_is_smaller_and_answers_close(corpus_dir, tmp_path, make_engine):
    with new_kb(tmp_path / "kb", make_engine, fp8=True) as kb:
        kb.add_paths([CORPUS])
        fp8_bytes, fp8_per_token = kb.stats()["kv_bytes"], kb.stats()["kv_bytes_per_token"]
        question = questions()[4]["question"]
        answer = kb.ask(question, k=3, **GEN)
    with KnowledgeBase.open(corpus_dir, make_engine("llama")) as exact:
        exact_bytes, exact_per_token = exact.stats()["kv_bytes"], exact.stats()["kv_bytes_per_token"]
        reference = exact.ask(question, k=3, **GEN)
    ratio = fp8_bytes / exact_bytes
    drift = float((answer.generation.prefill.logits - reference.generation.prefill.logits).abs().max())
    print(f"\nfp8 knowledge base: {fp8_bytes} vs {exact_bytes} bytes fp32 ({ratio:.3f}); max logit drift {drift:.4f}")
    assert ratio < 0.45 and answer.usage.encoded_tokens == 0
    assert 0.2 < fp8_per_token / exact_per_token < 0.45  # the per-token figure follows the codec
    assert 0 < drift < 0.1 * float(reference.generation.prefill.logits.abs().max())


def test_stale_temp_files_are_removed_by_the_next_writer(tmp_path, make_engine):
    path = tmp_path / "kb"
    with new_kb(path, make_engine) as kb:
        stale = path / "kv" / ".tmp" / ".tmp-999999999-0123456789ab-x.safetensors"
        stale.write_bytes(b"partial")
        assert kb.verify()["temp_files"] == [str(stale)]
        kb.add_documents([Document("Moss grows on the north side.")])
        assert not stale.exists() and kb.verify()["temp_files"] == []


def test_ingest_is_timed(tmp_path, make_engine):
    with new_kb(tmp_path / "kb", make_engine) as kb:
        start = time.perf_counter()
        report = kb.add_paths([CORPUS])
        elapsed = time.perf_counter() - start
        # the report times the ingest itself: nearly all of the call (reading 11 small files is the rest)
        assert 0.8 * elapsed <= report.seconds <= elapsed, (report.seconds, elapsed)
        assert report.tokens_encoded == kb.stats()["passage_tokens"]  # every block encoded once
        assert f"({report.tokens_encoded} tokens, {report.tokens_encoded / report.seconds:.0f} tokens/s)" in str(report)
        skipped = kb.add_paths([CORPUS])  # a re-run encodes nothing and reports no rate
        assert skipped.tokens_encoded == 0 and "(0 tokens, 0 tokens/s)" in str(skipped)


def test_damaged_index_is_rebuilt_and_damaged_docstore_refused(corpus_dir, tmp_path, make_engine, caplog):
    path = copy_kb(corpus_dir, tmp_path / "kb")
    (path / "index.faiss").write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING, logger="blockrag.index"):
        with KnowledgeBase.open(path, make_engine("llama")) as kb:
            q = questions()[6]
            assert kb.search(q["question"], 1)[0].doc_id == q["doc_id"]
    assert "rebuilding the vector index from the docstore" in caplog.text
    (path / "index.faiss").unlink()
    with KnowledgeBase.open(path) as kb:
        assert kb.stats()["vectors"] == kb.stats()["passages"]
    (path / "docstore.sqlite").write_bytes(b"not a database" * 100)
    for name in ("docstore.sqlite-wal", "docstore.sqlite-shm"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(KnowledgeBaseError, match="expected an SQLite docstore"):
        KnowledgeBase.open(path)


def test_the_store_is_attached_to_the_engine_while_open_and_ingest_writes_only_to_disk(tmp_path, corpus_dir,
                                                                                      make_engine):
    engine = make_engine("llama")
    own = engine.store
    with new_kb(tmp_path / "kb", lambda _: engine) as kb:
        kb.add_documents([Document("Moss grows on the north side of old oaks.", id="moss")])
        assert len(own) == 0  # ingest puts its blocks into the knowledge base's store, not the engine's
        key = kb.search("moss", 1)[0].block_key
        assert kb.kv.contains(key) and engine.store.get(key) is not None  # the engine reads the KB's disk
        assert own.get(key) is not None  # ... and keeps what it read in its own store
        with KnowledgeBase.open(corpus_dir, engine) as other:  # a second KB on the same engine
            other_key = other.search(questions()[0]["question"], 1)[0].block_key
            assert engine.store.get(other_key) is not None
        assert engine.store.get(key) is not None  # closing the second one leaves the first attached
        own.delete(key)
        assert engine.store.get(key) is not None
    assert engine.store is own
    own.delete(key)
    assert engine.store.get(key) is None  # detached: the disk is no longer read


def test_a_schema_1_docstore_is_migrated_to_per_model_kv(corpus_dir, tmp_path, make_engine):
    import sqlite3

    path = copy_kb(corpus_dir, tmp_path / "kb")
    with sqlite3.connect(path / "docstore.sqlite") as conn:  # what an older blockrag wrote: one model, in meta
        prefix = conn.execute("SELECT prefix_block_key FROM models").fetchone()[0]
        conn.execute("DROP TABLE model_blocks")
        conn.execute("DROP TABLE models")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute("INSERT INTO meta(key, value) VALUES ('prefix_block_key', ?)", (prefix,))
    with KnowledgeBase.open(path) as kb:  # no engine: migration needs no model
        stats = kb.stats()
        assert len(stats["models"]) == 1 and stats["models"][0]["passages"] == stats["passages"]
        assert stats["orphan_blocks"] == 0 and kb.verify(deep=True)["ok"]
        assert kb.docstore.get_meta("schema_version") == "2"
    with KnowledgeBase.open(path, make_engine("llama")) as kb:
        answer = kb.ask(questions()[0]["question"], k=2, **GEN)
        assert answer.usage.encoded_tokens == 0  # block 0 and the passages are the stored ones


def test_ingest_progress_counts_passages_encoded_of_those_to_encode(tmp_path, make_engine, capsys):
    with new_kb(tmp_path / "kb", make_engine) as kb:
        capsys.readouterr()
        report = kb.add_paths([CORPUS], progress=True, batch_tokens=512)  # several commits
        bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
        n = report.blocks_encoded
        assert n > 10 and report.documents_added == 11
        final = [line for line in bar if f"{n}/{n}" in line]
        assert final and "100%" in final[-1] and "tokens/s" in final[-1] and "passage" in final[-1], bar[-3:]
        partial = [line for line in bar if f"/{n} " in line and f"{n}/{n}" not in line]
        assert partial  # the total was known before the first block was encoded
        assert kb.add_paths([CORPUS], progress=True).blocks_encoded == 0
        assert "encode: 0passage" in capsys.readouterr().err  # nothing to encode on a re-run
