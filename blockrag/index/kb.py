"""KnowledgeBase: documents -> passages -> (KV blocks on disk, embeddings in FAISS, rows in SQLite) -> answers.

A knowledge base is a directory::

    manifest.json      format version, embedder id and dimension, chunking, index kind, KV codec
    docstore.sqlite    documents and passages (with embeddings), model fingerprint: the source of truth
    index.faiss        vector index snapshot (patched from the docstore on open if it is behind)
    kv/                one safetensors file per passage block, named by its content key (DiskKVStore)
    .writer.lock       one writing process at a time (flock)

Crash safety rests on one order of operations per ingest batch: KV files are written (atomically) first,
then the docstore transaction commits the passages that point at them, then the in-memory index is updated;
the index file is saved at the end. So no committed passage ever points at a missing or partial KV file;
a crash can only leave KV files no passage references yet (reported by ``verify``/``stats``, reused by a
re-run, removed by ``gc``) and temp files of a dead process (removed by the next writer).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from blockrag.engine import BlockEngine, Generation, GenerationStream, Usage
from blockrag.errors import InvalidInputError, KVBlockMismatchError, PromptTooLongError
from blockrag.index.chunker import chunk_text
from blockrag.index.docstore import Docstore, NewPassage
from blockrag.index.documents import Document, load_paths, validate_document
from blockrag.index.embedder import Embedder
from blockrag.index.errors import (
    EmbedderMismatchError,
    EmptyKnowledgeBaseError,
    KnowledgeBaseError,
    KnowledgeBaseLockedError,
    NotAKnowledgeBaseError,
)
from blockrag.index.vectors import KINDS, VectorIndex
from blockrag.kv import KVBlock
from blockrag.store.atomic import TEMP_PREFIX, atomic_write, pid_alive, temp_owner_pid
from blockrag.store.disk import DiskKVStore, decode_block
from blockrag.store.errors import CorruptBlockError, StoreWriteError
from blockrag.store.memory import MemoryKVStore
from blockrag.store.tiered import TieredKVStore
from blockrag.template import Passage

logger = logging.getLogger("blockrag.index")

FORMAT = "blockrag-kb"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCSTORE = "docstore.sqlite"
INDEX = "index.faiss"
KV_DIR = "kv"
TMP_DIR = ".tmp"
LOCK = ".writer.lock"
_OWN_ENTRIES = {MANIFEST, DOCSTORE, DOCSTORE + "-wal", DOCSTORE + "-shm", DOCSTORE + "-journal", INDEX, KV_DIR,
                TMP_DIR, LOCK}
ON_MISMATCH = ("recompute", "refuse")


@dataclass(frozen=True)
class SearchHit:
    """One retrieved passage.

    Attributes:
        passage_id: "<doc_id>#<index>".
        doc_id: its document.
        text: passage text (without title or template).
        title: the document title, if any.
        score: cosine similarity with the query (higher is better).
        block_key: content key of the passage's KV block for the KB's model.
        source: where the document came from (path, URL), if known.
        token_count: tokens of the passage block (title and template included).
        metadata: JSON-safe: the document's metadata plus chunk_index, char_start, char_end.
    """

    passage_id: str
    doc_id: str
    text: str
    title: str | None
    score: float
    block_key: str
    source: str | None
    token_count: int
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """An answer with the passages it was given and the engine's accounting."""

    text: str
    sources: list[SearchHit]
    usage: Usage
    generation: Generation


@dataclass
class IngestReport:
    """What an ingest did.

    documents_skipped counts unchanged re-ingests, duplicates of another document's content and empty
    documents (each skipped document other than an unchanged one also has a line in ``warnings``).
    blocks_reused counts passage blocks already on disk (shared text, or a resumed ingest).
    """

    documents_added: int = 0
    documents_updated: int = 0
    documents_skipped: int = 0
    passages_added: int = 0
    passages_removed: int = 0
    blocks_encoded: int = 0
    blocks_reused: int = 0
    tokens_encoded: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rate = self.tokens_encoded / self.seconds if self.seconds > 0 else 0.0
        return (f"documents: {self.documents_added} added, {self.documents_updated} updated, "
                f"{self.documents_skipped} skipped | passages: {self.passages_added} added, "
                f"{self.passages_removed} removed | KV blocks: {self.blocks_encoded} encoded "
                f"({self.tokens_encoded} tokens, {rate:.0f} tokens/s), {self.blocks_reused} already stored | "
                f"{self.seconds:.1f} s")


@dataclass
class _Pending:
    doc: Document
    doc_id: str
    content_hash: str
    update: bool
    passages: list[dict[str, Any]]


def _model_record(meta: dict[str, str]) -> dict[str, Any]:
    return {"name": meta.get("model"), "fingerprint": meta.get("fingerprint"), "template": meta.get("template"),
            "template_version": meta.get("template_version"), "kv_dtype": meta.get("kv_dtype")}


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=2).encode(), tmp_dir=path / TMP_DIR)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"expected k to be an int >= 1, found {k!r}")
    return k


def _check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError(f"expected a non-empty question, found {question!r}")
    return question


def _embed_text(title: str | None, text: str) -> str:
    return f"{title}\n{text}" if title else text


class KnowledgeBase:
    """An indexed knowledge base whose passages' KV is computed once, at ingest.

    Use ``KnowledgeBase.create`` or ``KnowledgeBase.open``; close it (or use it as a context manager) when done.
    While open, ``engine.store`` is a tiered store (the engine's memory store in front of this KB's disk
    store), so ``engine.generate`` counts KB blocks as cached; ``close`` puts the engine's store back.
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
        self._write_lock = threading.RLock()
        self._index_lock = threading.RLock()
        self._writing_depth = 0
        self._closed = False
        self.kv = DiskKVStore(path / KV_DIR, fp8=bool(manifest["kv"]["fp8"]), strict=strict)
        self._saved_store = None
        self._index = self._load_index()
        self._index_version = -1
        self._sync_index()

    # --- create / open ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, engine: BlockEngine, embedder: Embedder | str | None = None, *,
               model_name: str | None = None, chunk_tokens: int = 256, chunk_overlap: int = 32,
               index: str = "flat", fp8: bool = False, strict: bool = False, lock_timeout: float = 60.0
               ) -> KnowledgeBase:
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
        """
        path = Path(path)
        if engine is None or not isinstance(engine, BlockEngine):
            raise InvalidInputError(f"expected a BlockEngine to create a knowledge base, found {type(engine).__name__}")
        if (path / MANIFEST).exists():
            raise KnowledgeBaseError(f"expected a new directory, found a knowledge base already at {path}; "
                                     "open it with KnowledgeBase.open")
        if path.exists() and not path.is_dir():
            raise KnowledgeBaseError(f"expected a directory for the knowledge base, found a file at {path}")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _OWN_ENTRIES) if path.exists() else []
        if foreign:
            raise KnowledgeBaseError(f"expected an empty or new directory for a new knowledge base, found "
                                     f"{len(foreign)} other entries in {path} (e.g. {foreign[0]!r})")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 8:
            raise InvalidInputError(f"expected chunk_tokens >= 8, found {chunk_tokens!r}")
        if not isinstance(chunk_overlap, int) or not 0 <= chunk_overlap <= chunk_tokens // 2:
            raise InvalidInputError(f"expected 0 <= chunk_overlap <= chunk_tokens // 2, found {chunk_overlap!r}")
        if index not in KINDS:
            raise InvalidInputError(f"expected index kind in {KINDS}, found {index!r}")
        embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
        (path / TMP_DIR).mkdir(parents=True, exist_ok=True)
        (path / KV_DIR).mkdir(exist_ok=True)
        docstore = Docstore(path / DOCSTORE)
        with docstore.transaction() as tx:
            tx.set_meta("fingerprint", engine.fingerprint)
            tx.set_meta("template_version", engine.template.version)
            tx.set_meta("template", engine.template.name)
            tx.set_meta("model", model_name or engine.model_name)
            tx.set_meta("kv_dtype", str(engine.dtype).removeprefix("torch."))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "embedder": {"id": embedder.id, "dim": embedder.dim},
            "chunking": {"max_tokens": chunk_tokens, "overlap": chunk_overlap},
            "index": {"kind": index},
            "kv": {"fp8": bool(fp8)},
            "model": _model_record(docstore.meta()),
        }
        # NOTE: the manifest is written last: a directory without one is not (yet) a knowledge base.
        _write_manifest(path, manifest)
        kb = cls(path, manifest, docstore, embedder, strict=strict, lock_timeout=lock_timeout)
        kb._attach(engine, "refuse")
        return kb

    @classmethod
    def open(cls, path: str | os.PathLike, engine: BlockEngine | None = None,
             embedder: Embedder | str | None = None, *, on_mismatch: str = "recompute", strict: bool = False,
             model_name: str | None = None, lock_timeout: float = 60.0) -> KnowledgeBase:
        """Open an existing knowledge base.

        Args:
            path: the knowledge base directory.
            engine: the BlockEngine to answer with; None opens it for search and maintenance only.
            embedder: None loads the embedder recorded in the manifest (lazily); one given must match it.
            on_mismatch: what to do if ``engine`` is not the model the KV was built with: "recompute"
                (stored blocks are never used; blocks are re-encoded for this model when first needed) or
                "refuse" (raise KVBlockMismatchError).
            strict: refuse damaged or wrong-model KV files (raise) instead of recomputing them.
            model_name: how to load ``engine``'s model again, recorded if it replaces the KB's model.

        Raises:
            NotAKnowledgeBaseError: no knowledge base at path.
            KVBlockMismatchError: other model and on_mismatch="refuse".
            EmbedderMismatchError: embedder given is not the KB's.
        """
        path = Path(path)
        if on_mismatch not in ON_MISMATCH:
            raise InvalidInputError(f"expected on_mismatch in {ON_MISMATCH}, found {on_mismatch!r}")
        manifest = cls._read_manifest(path)
        if embedder is not None:
            embedder = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
            want = manifest["embedder"]
            if (embedder.id, embedder.dim) != (want["id"], want["dim"]):
                raise EmbedderMismatchError(
                    f"knowledge base at {path} was embedded with {want['id']} (dim {want['dim']}), found embedder "
                    f"{embedder.id} (dim {embedder.dim}); pass embedder=None to use the knowledge base's own")
        docstore = Docstore(path / DOCSTORE)
        kb = cls(path, manifest, docstore, embedder, strict=strict, lock_timeout=lock_timeout)
        if engine is not None:
            kb._attach(engine, on_mismatch, model_name)
        return kb

    @classmethod
    def info(cls, path: str | os.PathLike) -> dict[str, Any]:
        """Manifest and recorded model of a knowledge base, without loading any model.

        Raises:
            NotAKnowledgeBaseError: no knowledge base at path.
        """
        path = Path(path)
        manifest = cls._read_manifest(path)
        docstore = Docstore(path / DOCSTORE)
        try:
            meta = docstore.meta()
        finally:
            docstore.close()
        return {"manifest": manifest, "model": _model_record(meta)}

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise NotAKnowledgeBaseError(f"expected a knowledge base directory at {path}, found "
                                         f"{'a file' if path.exists() else 'nothing'}; create one with "
                                         f"`blockrag ingest PATH --kb {path}` or KnowledgeBase.create")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            entries = len(list(path.iterdir()))
            raise NotAKnowledgeBaseError(
                f"expected a knowledge base at {path} (with {MANIFEST}), found a directory with {entries} entries "
                f"and no manifest; create one with `blockrag ingest PATH --kb {path}` or KnowledgeBase.create")
        try:
            manifest = json.loads(manifest_path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KnowledgeBaseError(f"expected a JSON manifest at {manifest_path}, found unreadable content ({e})"
                                     ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise NotAKnowledgeBaseError(f"expected a {FORMAT} manifest at {manifest_path}, found "
                                         f"format {manifest.get('format') if isinstance(manifest, dict) else None!r}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise KnowledgeBaseError(f"expected knowledge base format version {FORMAT_VERSION}, found "
                                     f"{manifest.get('format_version')!r} at {path}; use a matching blockrag version")
        return manifest

    def _attach(self, engine: BlockEngine, on_mismatch: str, model_name: str | None = None) -> None:
        """Use ``engine`` for this KB; handle a model or template other than the one the KV was built with."""
        meta = self.docstore.meta()
        built = (meta.get("fingerprint"), meta.get("template_version"))
        if built != (engine.fingerprint, engine.template.version):
            what = (f"knowledge base at {self.path} was built with model fingerprint {str(built[0])[:12]} "
                    f"(model {meta.get('model')!r}, template {meta.get('template')!r} {str(built[1])[:8]}), the engine "
                    f"has {engine.fingerprint[:12]} (model {engine.model_name!r}, template {engine.template.name!r} "
                    f"{engine.template.version[:8]})")
            if on_mismatch == "refuse":
                raise KVBlockMismatchError(
                    f"{what}; refusing to open (on_mismatch='refuse'). Open with on_mismatch='recompute' "
                    "(CLI: --on-mismatch recompute) to re-encode blocks for this model as they are needed, or use "
                    "the original model")
            logger.warning("%s; stored KV blocks will not be used: blocks are re-encoded for this model when first "
                           "needed (on_mismatch='recompute')", what)
        self.engine = engine
        self.kv.fingerprint = engine.fingerprint
        self._saved_store = engine.store
        front = engine.store if isinstance(engine.store, MemoryKVStore) else MemoryKVStore()
        engine.store = TieredKVStore(front, self.kv, tolerate_write_errors=True)
        if built != (engine.fingerprint, engine.template.version):
            self._rekey(model_name)

    def _rekey(self, model_name: str | None) -> None:
        """Point every passage at its block key for the current engine (blocks are encoded lazily)."""
        engine = self._require_engine("re-key passages")
        with self._writing():
            with self.docstore.transaction() as tx:
                for row in self.docstore.iter_passages():
                    ids = engine.block_ids(Passage(row["text"], row["title"]))
                    tx.set_block(row["vec_id"], engine.key_of(ids), len(ids))
                tx.set_meta("fingerprint", engine.fingerprint)
                tx.set_meta("template_version", engine.template.version)
                tx.set_meta("template", engine.template.name)
                tx.set_meta("model", model_name or engine.model_name)
                tx.set_meta("kv_dtype", str(engine.dtype).removeprefix("torch."))
                tx.set_meta("prefix_block_key", "")
                tx.bump_version()
            # NOTE: the docstore is authoritative; the manifest mirrors it for people reading the directory.
            self.manifest["model"] = _model_record(self.docstore.meta())
            _write_manifest(self.path, self.manifest)

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

    @contextmanager
    def _writing(self):
        """This process's one writer (re-entrant), holding the cross-process writer lock."""
        with self._write_lock:
            if self._writing_depth:
                self._writing_depth += 1
                try:
                    yield
                finally:
                    self._writing_depth -= 1
                return
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                deadline = time.monotonic() + self.lock_timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise KnowledgeBaseLockedError(
                                f"expected to get the writer lock of {self.path} within {self.lock_timeout:.0f} s, "
                                "found another process writing to it; wait for it to finish") from None
                        time.sleep(0.05)
                self._writing_depth = 1
                self._clean_temp()
                try:
                    yield
                finally:
                    self._writing_depth = 0
            finally:
                os.close(fd)  # releases the flock

    def _clean_temp(self) -> int:
        removed = self.kv.clean_temp()
        tmp = self.path / TMP_DIR
        tmp.mkdir(exist_ok=True)
        for entry in tmp.iterdir():
            pid = temp_owner_pid(entry.name)
            if entry.name.startswith(TEMP_PREFIX) and not (pid is not None and pid_alive(pid)):
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- vector index ----------------------------------------------------------------------------

    def _load_index(self) -> VectorIndex:
        kind, dim = self.manifest["index"]["kind"], self.manifest["embedder"]["dim"]
        file = self.path / INDEX
        if file.exists():
            try:
                index = VectorIndex.load(file, kind)
                if index.dim == dim:
                    return index
                logger.warning("vector index %s has dimension %d, expected %d; rebuilding it", file, index.dim, dim)
            except ValueError as e:
                logger.warning("%s; rebuilding the vector index from the docstore", e)
        return VectorIndex(dim, kind)

    def _sync_index(self) -> None:
        """Bring the in-memory index in line with the docstore (other processes, or a stale index file)."""
        version = self.docstore.version()
        if version == self._index_version:
            return
        with self._index_lock:
            in_db = self.docstore.vec_ids()
            have = self._index.ids()
            extra, missing = have - in_db, in_db - have
            if extra and not self._index.supports_remove:
                self._rebuild_index()
            else:
                if extra:
                    self._index.remove(extra)
                if missing:
                    ids, vectors = self.docstore.embeddings(missing)
                    self._index.add(ids, vectors)
            self._index_version = version

    def _rebuild_index(self) -> None:
        with self._index_lock:
            fresh = VectorIndex(self.manifest["embedder"]["dim"], self.manifest["index"]["kind"])
            ids, vectors = self.docstore.embeddings()
            if len(ids):
                fresh.add(ids, vectors)
            self._index = fresh

    def _save_index(self) -> None:
        with self._index_lock:
            self._index.save(self.path / INDEX, tmp_dir=self.path / TMP_DIR)

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
        report = IngestReport()
        start = time.perf_counter()
        from tqdm.auto import tqdm

        with self._writing(), tqdm(desc="ingest", unit="doc", disable=not progress, file=sys.stderr) as bar:
            self._ensure_prefix_block()
            batch: list[_Pending] = []
            hashes: dict[str, str] = {}
            for doc in docs:
                validate_document(doc)
                if any(p.doc_id == doc.doc_id for p in batch):
                    self._commit(batch, report)  # the same id twice: the later one must see the earlier
                    batch = []
                pending = self._prepare(doc, report, hashes)
                bar.update(1)
                if pending is None:
                    continue
                batch.append(pending)
                if sum(p["token_count"] for q in batch for p in q.passages) >= budget:
                    self._commit(batch, report)
                    bar.set_postfix(tokens=report.tokens_encoded)
                    batch = []
            if batch:
                self._commit(batch, report)
            self._save_index()
        report.seconds = time.perf_counter() - start
        for line in report.warnings:
            logger.info(line)
        return report

    def _prepare(self, doc: Document, report: IngestReport, hashes: dict[str, str]) -> _Pending | None:
        """Chunk one (validated) document, or None if it is skipped."""
        doc_id, content_hash = doc.doc_id, doc.content_hash
        if not doc.text.strip():
            report.documents_skipped += 1
            report.warnings.append(f"skipped document {doc_id!r}: its text is empty")
            return None
        existing = self.docstore.document(doc_id)
        if existing is not None and existing["content_hash"] == content_hash:
            report.documents_skipped += 1
            return None
        twin = hashes.get(content_hash) or self.docstore.document_with_hash(content_hash)
        if existing is None and twin is not None and twin != doc_id:
            report.documents_skipped += 1
            report.warnings.append(f"skipped document {doc_id!r}: same content as document {twin!r}")
            return None
        hashes[content_hash] = doc_id
        engine = self.engine
        chunking = self.manifest["chunking"]
        passages = []
        for index, chunk in enumerate(chunk_text(doc.text, engine.tokenizer, chunking["max_tokens"],
                                                 chunking["overlap"])):
            rendered = engine.template.render_passage(Passage(chunk.text, doc.title))
            ids = engine.template.tokenize(engine.tokenizer, rendered)
            passages.append({
                "id": f"{doc_id}#{index}", "idx": index, "text": chunk.text, "rendered": rendered, "ids": ids,
                "key": engine.key_of(ids), "token_count": len(ids), "start": chunk.start, "end": chunk.end,
            })
        longest = max(p["token_count"] for p in passages)
        if engine.max_positions is not None and longest > engine.max_positions:
            raise PromptTooLongError(f"a passage block of document {doc_id!r} has {longest} tokens, the model accepts "
                                     f"at most {engine.max_positions} positions; ingest with fewer chunk tokens")
        return _Pending(doc, doc_id, content_hash, existing is not None, passages)

    def _commit(self, batch: list[_Pending], report: IngestReport) -> None:
        """KV files first, then one docstore transaction, then the in-memory index (see the module docstring)."""
        if not batch:
            return
        engine = self.engine
        todo: dict[str, dict[str, Any]] = {}
        for pending in batch:
            for p in pending.passages:
                if p["key"] in todo:
                    continue
                if self.kv.contains(p["key"]):
                    report.blocks_reused += 1
                else:
                    todo[p["key"]] = p
        if todo:
            items = list(todo.values())
            blocks = engine.encoder.encode([p["ids"] for p in items], [p["key"] for p in items],
                                           [p["rendered"] for p in items])
            self.kv.put_many(blocks)  # raises StoreWriteError (e.g. disk full) before anything is committed
            report.blocks_encoded += len(blocks)
            report.tokens_encoded += sum(b.num_tokens for b in blocks)
            del blocks
        flat = [(pending, p) for pending in batch for p in pending.passages]
        vectors = self.embedder.embed([_embed_text(pending.doc.title, p["text"]) for pending, p in flat])
        removed: list[tuple[int, str]] = []
        added_ids: list[int] = []
        try:
            with self.docstore.transaction() as tx:
                row = 0
                for pending in batch:
                    doc = pending.doc
                    if pending.update:
                        removed += tx.delete_document(pending.doc_id)
                    rows = []
                    for p in pending.passages:
                        metadata = {**doc.metadata, "chunk_index": p["idx"], "char_start": p["start"],
                                    "char_end": p["end"]}
                        rows.append(NewPassage(p["id"], pending.doc_id, p["idx"], doc.title, p["text"], metadata,
                                               p["start"], p["end"], p["token_count"], p["key"], vectors[row]))
                        row += 1
                    added_ids += tx.insert_document(pending.doc_id, pending.content_hash, doc.title, doc.source,
                                                    doc.metadata, rows, len(doc.text))
                tx.bump_version()
        except sqlite3.Error as e:
            full = "full" in str(e).lower()
            message = (f"expected to commit {len(batch)} documents to {self.path / DOCSTORE}, found SQLite error: "
                       f"{e}; nothing of this batch was committed, the knowledge base is unchanged by it")
            if full:
                raise StoreWriteError(28, message + "; free disk space and re-run") from e
            raise KnowledgeBaseError(message) from e
        for pending in batch:
            if pending.update:
                report.documents_updated += 1
            else:
                report.documents_added += 1
        report.passages_added += len(added_ids)
        report.passages_removed += len(removed)
        with self._index_lock:
            if removed:
                self._remove_vectors([vec_id for vec_id, _ in removed])
            self._index.add(np.asarray(added_ids, dtype=np.int64), vectors)
        self._collect({key for _, key in removed})

    def _remove_vectors(self, vec_ids: list[int]) -> None:
        with self._index_lock:
            if self._index.supports_remove:
                self._index.remove(vec_ids)
            else:
                self._rebuild_index()

    def _collect(self, keys: set[str]) -> int:
        """Delete KV files of keys that no passage references any more (after the commit that dropped them)."""
        if not keys:
            return 0
        pinned = self.docstore.get_meta("prefix_block_key", "")
        still = self.docstore.referenced_keys()
        removed = 0
        for key in keys - still - {pinned}:
            removed += bool(self.kv.delete(key))
            if self.engine is not None:
                self.engine.store.delete(key)
        return removed

    def _ensure_prefix_block(self) -> None:
        """Encode block 0 (instruction header) at ingest too, so the first question finds it cached."""
        engine = self.engine
        text = engine.template.render_prefix()
        if not text:
            return
        ids = engine.prefix_ids()
        key = engine.key_of(ids)
        if not self.kv.contains(key):
            self.kv.put_many(engine.encoder.encode([ids], [key], [text]))
        if self.docstore.get_meta("prefix_block_key") != key:
            with self.docstore.transaction() as tx:
                tx.set_meta("prefix_block_key", key)

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
            removed: list[tuple[int, str]] = []
            found, missing = [], []
            with self.docstore.transaction() as tx:
                for doc_id in ids:
                    if not tx.document_exists(doc_id):
                        missing.append(doc_id)
                        continue
                    removed += tx.delete_document(doc_id)
                    found.append(doc_id)
                tx.bump_version()
            self._remove_vectors([vec_id for vec_id, _ in removed])
            blocks = self._collect({key for _, key in removed})
            self._save_index()
        return {"documents_deleted": len(found), "passages_removed": len(removed), "blocks_deleted": blocks,
                "not_found": missing}

    # --- retrieval and answers -------------------------------------------------------------------

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """Top-k passages by cosine similarity, best first; fewer if the knowledge base has fewer."""
        _check_question(query)
        _check_k(k)
        if self._closed:
            raise KnowledgeBaseError(f"expected an open knowledge base to search, found {self.path} closed")
        self._sync_index()
        with self._index_lock:
            if len(self._index) == 0:
                return []
        vector = self.embedder.embed_query(query)
        with self._index_lock:
            # NOTE: a few extra candidates cover passages deleted between the search and the docstore read.
            scores, ids = self._index.search(vector, k + 8)
        rows = self.docstore.passages(ids.tolist())
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
            JSON-safe dict: missing_blocks (passage keys without a KV file), corrupt_blocks (deep only),
            orphan_blocks (KV files no passage references, other than the instruction block), temp_files,
            index_missing / index_extra (docstore ids absent from / extra in the saved index file), ok.
        """
        referenced = self.docstore.referenced_keys()
        files = set(self.kv.keys())
        pinned = {self.docstore.get_meta("prefix_block_key", "")} - {""}
        corrupt: list[str] = []
        if deep:
            fingerprint = self.docstore.get_meta("fingerprint")
            for key in sorted(referenced & files):
                try:
                    decode_block(self.kv.path_of(key).read_bytes(), key=key, fingerprint=fingerprint)
                except (CorruptBlockError, KVBlockMismatchError, FileNotFoundError):
                    corrupt.append(key)
        saved_ids: set[int] = set()
        if (self.path / INDEX).exists():
            try:
                saved_ids = VectorIndex.load(self.path / INDEX, self.manifest["index"]["kind"]).ids()
            except ValueError:
                saved_ids = set()
        in_db = self.docstore.vec_ids()
        temps = [str(p) for p in self.kv.temp_files()] + [
            str(p) for p in (self.path / TMP_DIR).glob(TEMP_PREFIX + "*")]
        report = {
            "passages": len(in_db),
            "missing_blocks": sorted(referenced - files),
            "corrupt_blocks": corrupt,
            "orphan_blocks": sorted(files - referenced - pinned),
            "temp_files": temps,
            "index_missing": len(in_db - saved_ids),
            "index_extra": len(saved_ids - in_db),
        }
        report["ok"] = not (report["missing_blocks"] or corrupt)
        return report

    def gc(self) -> dict[str, int]:
        """Remove KV files no passage references (except the instruction block) and stale temp files."""
        with self._writing():
            temps = self._clean_temp()
            pinned = self.docstore.get_meta("prefix_block_key", "")
            referenced = self.docstore.referenced_keys()
            removed = 0
            for key in list(self.kv.keys()):
                if key not in referenced and key != pinned:
                    removed += bool(self.kv.delete(key))
        return {"blocks_deleted": removed, "temp_files_deleted": temps}

    def stats(self) -> dict[str, Any]:
        """JSON-safe summary: counts, sizes, model, embedder, chunking, index and KV settings."""
        counts = self.docstore.counts()
        meta = self.docstore.meta()
        usage = self.kv.usage()
        referenced = self.docstore.referenced_keys()
        on_disk = set(self.kv.keys())
        pinned = {meta.get("prefix_block_key", "")} - {""}
        with self._index_lock:
            vectors = len(self._index)
        return {
            "path": str(self.path),
            "format_version": self.manifest["format_version"],
            **counts,
            "kv_blocks": usage["blocks"],
            "kv_bytes": usage["bytes"],
            "blocks_missing": len(referenced - on_disk),
            "orphan_blocks": len(on_disk - referenced - pinned),
            "kv_fp8": self.manifest["kv"]["fp8"],
            "kv_dtype": meta.get("kv_dtype"),
            "vectors": vectors,
            "index": self.manifest["index"]["kind"],
            "embedder": dict(self.manifest["embedder"]),
            "chunking": dict(self.manifest["chunking"]),
            "model": _model_record(meta),
            "kv_discarded": dict(self.kv.discarded),
        }

    def close(self) -> None:
        """Release files and give the engine its own store back. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.engine is not None and self._saved_store is not None:
            self.engine.store = self._saved_store
        self.kv.close()
        self.docstore.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeBase({str(self.path)!r})"
