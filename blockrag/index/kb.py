"""KnowledgeBase: documents -> passages -> (KV blocks on disk, embeddings in FAISS, rows in SQLite) -> answers.

The facade over the parts, each in its own module: ``layout`` (the directory and its manifest), ``lock`` (one
writer), ``ingest`` (documents to committed passages and KV files, crash-safe order), ``mirror`` (the vector
index kept in line with the docstore), ``maintenance`` (verify, gc, stats, deletes; which KV files are
needed is decided once, in ``BlockCensus``) and ``docstore`` (the source of truth).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from blockrag.engine import BlockEngine, GenerationStream
from blockrag.errors import InvalidInputError
from blockrag.index import layout, maintenance, registry
from blockrag.index.attached import AttachedKVStore
from blockrag.index.docstore import Docstore
from blockrag.index.documents import Document, load_paths
from blockrag.index.embedder import Embedder
from blockrag.index.errors import EmbedderMismatchError, EmptyKnowledgeBaseError, KnowledgeBaseError
from blockrag.index.ingest import Ingester, IngestReport
from blockrag.index.lock import WriterLock
from blockrag.index.mirror import IndexMirror
from blockrag.index.results import Answer, SearchHit
from blockrag.kv import KVBlock
from blockrag.store.disk import DiskKVStore
from blockrag.template import Passage

__all__ = ["Answer", "IngestReport", "KnowledgeBase", "SearchHit"]

logger = logging.getLogger("blockrag.index")

ON_MISMATCH = ("add", "recompute", "refuse")  # NOTE: "recompute" is the former name of "add"


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"expected k to be an int >= 1, found {k!r}")
    return k


def _check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError(f"expected a non-empty question, found {question!r}")
    return question


class KnowledgeBase:
    """An indexed knowledge base whose passages' KV is computed once, at ingest.

    Use ``KnowledgeBase.create`` or ``KnowledgeBase.open``; close it (or use it as a context manager) when done.
    While open, the KB's disk store is attached to the engine (``engine.attach_store``), so
    ``engine.generate`` counts KB blocks as cached; ``close`` detaches it. The engine sees it through an
    ``AttachedKVStore``: blocks the engine writes through land on this KB's disk only if its docstore needs
    them, and nothing is deleted through the engine, so several KBs can share one engine.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], docstore: Docstore, embedder: Embedder | None, *,
                 strict: bool, lock_timeout: float) -> None:
        """Internal: use ``create`` or ``open``."""
        self.path = path
        self.manifest = manifest
        self.docstore = docstore
        self.engine: BlockEngine | None = None
        self.strict = strict
        self.lock_timeout = lock_timeout
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        self._closed = False
        self.kv = DiskKVStore(path / layout.KV_DIR, fp8=bool(manifest["kv"]["fp8"]), strict=strict)
        self._attached = AttachedKVStore(self.kv, docstore)
        self._writing = WriterLock(path / layout.LOCK, lock_timeout, self._clean_temp)
        self._index = IndexMirror(path / layout.INDEX, manifest["index"]["kind"], manifest["embedder"]["dim"],
                                  docstore, path / layout.TMP_DIR)

    # --- create / open ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, engine: BlockEngine, embedder: Embedder | str | None = None, *,
               model_name: str | None = None, chunk_tokens: int = 256, chunk_overlap: int = 32,
               index: str = "flat", fp8: bool = False, strict: bool = False, lock_timeout: float = 60.0,
               template_name: str | None = None) -> KnowledgeBase:
        """Make a new knowledge base in ``path`` (a new or empty directory).

        Args:
            path: directory to create.
            engine: the BlockEngine whose model encodes the KV blocks (its fingerprint is recorded).
            embedder: an Embedder, a sentence-transformers name/path, or None for all-MiniLM-L6-v2.
            model_name: how to load the model again (recorded for the CLI); default: the engine's model name.
            chunk_tokens: most tokens of passage text per passage (LLM tokenizer).
            chunk_overlap: tokens shared by consecutive passages of a document.
            index: "flat" (exact) or "hnsw" (approximate, for large corpora).
            fp8: store KV as fp8 e4m3 with per-(layer, head) scales (lossy, smaller).
            strict: refuse damaged or wrong-model KV files instead of recomputing them.
            template_name: how to rebuild the engine's template (recorded; default its name), e.g. the
                path of its JSON file.
        """
        path = Path(path)
        if engine is None or not isinstance(engine, BlockEngine):
            raise InvalidInputError(f"expected a BlockEngine to create a knowledge base, found {type(engine).__name__}")
        layout.check_new_directory(path)
        layout.check_settings(chunk_tokens, chunk_overlap, index)
        embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
        layout.make_directories(path)
        docstore = Docstore(path / layout.DOCSTORE)
        registry.add(docstore, engine, model_name, default=True, template=template_name)
        manifest = layout.new_manifest(embedder.id, embedder.dim, chunk_tokens, chunk_overlap, index, fp8,
                                       layout.model_record(docstore.meta()))
        manifest["models"] = layout.models_record(docstore.models())
        layout.write_manifest(path, manifest)  # NOTE: last: a directory without a manifest is no knowledge base
        kb = cls(path, manifest, docstore, embedder, strict=strict, lock_timeout=lock_timeout)
        kb._attach(engine, "refuse")
        return kb

    @classmethod
    def open(cls, path: str | os.PathLike, engine: BlockEngine | None = None,
             embedder: Embedder | str | None = None, *, on_mismatch: str = "add", strict: bool = False,
             model_name: str | None = None, lock_timeout: float = 60.0,
             template_name: str | None = None) -> KnowledgeBase:
        """Open an existing knowledge base.

        Args:
            path: the knowledge base directory.
            engine: the BlockEngine to answer with; None opens it for search and maintenance only.
            embedder: None loads the embedder recorded in the manifest (lazily); one given must match it.
            on_mismatch: what to do if ``engine``'s model is not one the KB holds KV for: "add" it (its
                blocks are encoded when first needed; the other models' KV is kept; "recompute" is an
                older name for this) or "refuse" (raise KVBlockMismatchError).
            strict: refuse damaged or wrong-model KV files (raise) instead of recomputing them.
            model_name: how to load ``engine``'s model again, recorded if the model is added.
            template_name: how to rebuild its template, recorded if the model is added (default its name).

        Raises:
            NotAKnowledgeBaseError: no knowledge base at path.
            KVBlockMismatchError: a model the KB does not know and on_mismatch="refuse".
            EmbedderMismatchError: embedder given is not the KB's.
        """
        path = Path(path)
        if on_mismatch not in ON_MISMATCH:
            raise InvalidInputError(f"expected on_mismatch in {ON_MISMATCH}, found {on_mismatch!r}")
        manifest = layout.read_manifest(path)
        if embedder is not None:
            embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
            want = manifest["embedder"]
            if (embedder.id, embedder.dim) != (want["id"], want["dim"]):
                raise EmbedderMismatchError(
                    f"knowledge base at {path} was embedded with {want['id']} (dim {want['dim']}), found embedder "
                    f"{embedder.id} (dim {embedder.dim}); pass embedder=None to use the knowledge base's own")
        docstore = Docstore(path / layout.DOCSTORE)
        kb = cls(path, manifest, docstore, embedder, strict=strict, lock_timeout=lock_timeout)
        if engine is not None:
            kb._attach(engine, on_mismatch, model_name, template_name)
        return kb

    @classmethod
    def info(cls, path: str | os.PathLike) -> dict[str, Any]:
        """Manifest and recorded model of a knowledge base, without loading any model.

        Raises:
            NotAKnowledgeBaseError: no knowledge base at path.
        """
        path = Path(path)
        manifest = layout.read_manifest(path)
        docstore = Docstore(path / layout.DOCSTORE)
        try:
            meta = docstore.meta()
        finally:
            docstore.close()
        return {"manifest": manifest, "model": layout.model_record(meta)}

    def _attach(self, engine: BlockEngine, on_mismatch: str, model_name: str | None = None,
                template_name: str | None = None) -> None:
        """Use ``engine`` for this KB; a model the KB does not know yet is added (or refused)."""
        if registry.needs_writing(self.docstore, engine, on_mismatch, self.path):
            with self._writing():  # NOTE: only then: a reader with a known model never waits for a writer
                if registry.add_if_new(self.docstore, engine, model_name, template_name):
                    self.manifest["models"] = layout.models_record(self.docstore.models())
                    layout.write_manifest(self.path, self.manifest)
                registry.fill_keys(self.docstore, engine)
        self.engine = engine
        self.kv.fingerprint = engine.fingerprint
        engine.attach_store(self._attached)

    def forget_model(self, selector: str) -> dict[str, Any]:
        """Drop a model's KV from the knowledge base: by name, fingerprint (or its first 8+ digits).

        Its block files become orphans (``gc`` deletes them). Refuses the last model.

        Returns:
            the forgotten model's record.
        """
        with self._writing():
            model = registry.forget(self.docstore, selector)
            self.manifest["model"] = layout.model_record(self.docstore.meta())
            self.manifest["models"] = layout.models_record(self.docstore.models())
            layout.write_manifest(self.path, self.manifest)
        return model

    # --- helpers ---------------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        """The KB's embedder (loaded on first use when the KB was opened without one)."""
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder(self.manifest["embedder"]["id"])
                if self._embedder.dim != self.manifest["embedder"]["dim"]:
                    raise EmbedderMismatchError(
                        f"expected embedding dimension {self.manifest['embedder']['dim']} for "
                        f"{self.manifest['embedder']['id']}, found {self._embedder.dim}")
            return self._embedder

    def _require_engine(self, what: str) -> BlockEngine:
        if self._closed:
            raise KnowledgeBaseError(f"expected an open knowledge base to {what}, found it closed")
        if self.engine is None:
            raise KnowledgeBaseError(f"expected a BlockEngine to {what}, found none; open the knowledge base with "
                                     "an engine: KnowledgeBase.open(path, engine)")
        return self.engine

    def _clean_temp(self) -> int:
        return self.kv.clean_temp() + layout.clean_temp(self.path)

    def _collect(self, keys: set[str]) -> int:
        # NOTE: only this KB's files: the engine's store also reads other KBs' disks, which may need the block.
        return maintenance.collect(self.docstore, self.kv, keys)

    # --- ingest ----------------------------------------------------------------------------------

    def add_paths(self, paths, glob: str | Iterable[str] | None = None, **kwargs) -> IngestReport:
        """Ingest files and directories (``.txt``, ``.md``, ``.jsonl``; directories recursively, glob-filtered).

        Empty, binary and non-UTF-8 files are skipped with a warning in the report. See ``add_documents``.
        """
        warnings: list[str] = []
        documents = load_paths(paths, glob, warnings)
        report = self.add_documents(documents, **kwargs)
        report.warnings[:0] = warnings
        return report

    def add_documents(self, docs: Iterable[Document], *, batch_tokens: int | None = None,
                      progress: bool | None = None) -> IngestReport:
        """Chunk, encode KV, embed and index documents; commit in batches of about ``batch_tokens`` tokens.

        A document whose id exists with the same content is skipped; with other content it is replaced
        (upsert). A document with the content of another document is skipped as a duplicate. Interrupted
        ingests can simply be re-run: committed documents are skipped, KV blocks already on disk reused.
        """
        engine = self._require_engine("ingest documents")
        if isinstance(docs, Document):
            raise InvalidInputError("expected an iterable of Documents, found a single Document; wrap it in a list")
        budget = batch_tokens or max(engine.encoder.token_budget, 4096)
        progress = sys.stderr.isatty() if progress is None else progress
        ingester = Ingester(engine, self.docstore, self.kv, lambda: self.embedder, self._index,
                            self.manifest["chunking"], self._collect)
        with self._writing():
            report = ingester.run(docs, budget, progress)
            self._index.save()
        for line in report.warnings:
            logger.info(line)
        return report

    def delete_documents(self, ids: Iterable[str]) -> dict[str, Any]:
        """Remove documents (and their passages, vectors and no longer referenced KV files).

        Returns:
            {"documents_deleted": n, "passages_removed": n, "blocks_deleted": n, "not_found": [ids]}.
        """
        if isinstance(ids, str):
            ids = [ids]
        ids = list(dict.fromkeys(ids))
        if not all(isinstance(i, str) and i for i in ids):
            raise InvalidInputError(f"expected non-empty string document ids, found {ids!r}")
        with self._writing():
            found, missing, removed = maintenance.delete_documents(self.docstore, ids)
            self._index.remove([vec_id for vec_id, _ in removed])
            blocks = self._collect({key for _, keys in removed for key in keys})
            self._index.save()
        return {"documents_deleted": len(found), "passages_removed": len(removed), "blocks_deleted": blocks,
                "not_found": missing}

    # --- retrieval and answers -------------------------------------------------------------------

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """Top-k passages by cosine similarity, best first; fewer if the knowledge base has fewer."""
        _check_question(query)
        _check_k(k)
        if self._closed:
            raise KnowledgeBaseError(f"expected an open knowledge base to search, found {self.path} closed")
        self._index.sync()
        if len(self._index) == 0:
            return []
        vector = self.embedder.embed_query(query)
        # NOTE: a few extra candidates cover passages deleted between the search and the docstore read.
        scores, ids = self._index.search(vector, k + 8)
        model = registry.id_of(self.engine) if self.engine is not None else None
        rows = self.docstore.passages(ids.tolist(), model)
        hits = []
        for score, vec_id in zip(scores.tolist(), ids.tolist()):
            row = rows.get(vec_id)
            if row is None:
                continue
            hits.append(SearchHit(passage_id=row.id, doc_id=row.doc_id, text=row.text, title=row.title,
                                  score=float(score), block_key=row.block_key, source=row.source,
                                  token_count=row.token_count, metadata=row.metadata))
            if len(hits) == k:
                break
        return hits

    def blocks_for(self, hits: Sequence[SearchHit]) -> list[KVBlock]:
        """KV blocks of passages: from the store, or encoded (and stored) now. Never a block of another model."""
        engine = self._require_engine("get KV blocks")
        if not hits:
            return []
        blocks = engine.encode([Passage(h.text, h.title) for h in hits])
        for hit, block in zip(hits, blocks):
            assert block.fingerprint == engine.fingerprint, "a block of another model reached the knowledge base"
            if block.key != hit.block_key:
                logger.debug("passage %s: docstore key %s differs from %s", hit.passage_id, hit.block_key[:12],
                             block.key[:12])
        return blocks

    def _retrieve(self, question: str, k: int) -> list[SearchHit]:
        _check_question(question)
        self._require_engine("answer questions")
        hits = self.search(question, k)
        if not hits:
            raise EmptyKnowledgeBaseError(
                f"expected passages to answer from, found an empty knowledge base at {self.path}; add documents "
                f"first (`blockrag ingest PATH --kb {self.path}` or kb.add_documents)")
        return hits

    def ask(self, question: str, k: int = 5, mode: str = "block", **generation_kwargs) -> Answer:
        """Retrieve k passages and answer from them. generation_kwargs go to ``BlockEngine.generate``
        (max_new_tokens, temperature, top_p, top_k, seed, stop, instruction, reencode)."""
        hits = self._retrieve(question, k)
        generation = self.engine.generate([Passage(h.text, h.title) for h in hits], question, mode=mode,
                                          **generation_kwargs)
        return Answer(text=generation.text, sources=hits, usage=generation.usage, generation=generation)

    def stream(self, question: str, k: int = 5, mode: str = "block", **generation_kwargs
               ) -> tuple[list[SearchHit], GenerationStream]:
        """Like ``ask``, but returns (sources, a stream of text deltas); ``stream.result`` once exhausted."""
        hits = self._retrieve(question, k)
        stream = self.engine.stream([Passage(h.text, h.title) for h in hits], question, mode=mode,
                                    **generation_kwargs)
        return hits, stream

    # --- maintenance -----------------------------------------------------------------------------

    def verify(self, deep: bool = False) -> dict[str, Any]:
        """Consistency report (read-only).

        Args:
            deep: also read every referenced KV file and check its checksum and fingerprint.

        Returns:
            JSON-safe dict: missing_blocks (keys ingest wrote whose KV file is gone), corrupt_blocks (deep only),
            orphan_blocks (KV files no passage references, other than the instruction block), temp_files,
            index_missing / index_extra (docstore ids absent from / extra in the saved index file), ok.
        """
        return maintenance.verify(self.path, self.docstore, self.kv, self._index, deep)

    def gc(self) -> dict[str, int]:
        """Remove KV files no passage references (except the instruction block) and stale temp files."""
        with self._writing():
            temps = self._clean_temp()
            removed = maintenance.gc(self.docstore, self.kv)
        return {"blocks_deleted": removed, "temp_files_deleted": temps}

    def stats(self) -> dict[str, Any]:
        """JSON-safe summary: counts, sizes (also per token and per passage, per model), models, embedder,
        chunking, index and KV settings."""
        return {"path": str(self.path), **maintenance.stats(self.docstore, self.kv, self.manifest),
                "vectors": len(self._index)}

    def close(self) -> None:
        """Release files and detach the KB's store from the engine. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.engine is not None:
            self.engine.detach_store(self._attached)
        self.kv.close()
        self.docstore.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r})"
