"""Ingest: documents -> planned passages -> KV files, then one docstore transaction, then the vector index.

Crash safety rests on that order of operations per batch: KV files are written (atomically) first, then
the docstore transaction commits the passages that point at them, then the in-memory index is updated;
the index file is saved at the end. So no committed passage ever points at a missing or partial KV file;
a crash can only leave KV files no passage references yet (reported by ``verify``/``stats``, reused by a
re-run, removed by ``gc``) and temp files of a dead process (removed by the next writer).
"""

from __future__ import annotations

import collections
import itertools
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockrag.engine import BlockEngine
from blockrag.errors import PromptTooLongError
from blockrag.index import registry
from blockrag.index.chunker import chunk_text
from blockrag.index.docstore import Docstore, NewPassage
from blockrag.index.documents import Document, validate_document
from blockrag.index.embedder import Embedder
from blockrag.index.errors import KnowledgeBaseError
from blockrag.index.mirror import IndexMirror
from blockrag.store.disk import DiskKVStore
from blockrag.store.errors import StoreWriteError
from blockrag.template import Passage


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


@dataclass(frozen=True)
class PlannedPassage:
    """One chunk of a document, rendered and tokenized as its KV block."""

    id: str
    idx: int
    text: str
    rendered: str
    token_ids: tuple[int, ...]
    key: str
    start: int
    end: int

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class PlannedDocument:
    """A document to commit: new (``update`` False) or replacing the stored one with the same id."""

    doc: Document
    update: bool
    passages: tuple[PlannedPassage, ...]

    @property
    def token_count(self) -> int:
        return sum(p.token_count for p in self.passages)


WINDOW_BATCHES = 64  # batches planned ahead of encoding (token ids of that many batches are held in memory)


def embed_text(title: str | None, text: str) -> str:
    return f"{title}\n{text}" if title else text


class Ingester:
    """Plans documents into passages and commits batches of them (see the module docstring for the order).

    Args:
        on_removed: called with the block keys of passages a commit replaced, after the commit.
    """

    def __init__(self, engine: BlockEngine, docstore: Docstore, kv: DiskKVStore, embedder: Callable[[], Embedder],
                 index: IndexMirror, chunking: dict[str, int], on_removed: Callable[[set[str]], object]) -> None:
        self.engine = engine
        self.docstore = docstore
        self.kv = kv
        self.embedder = embedder
        self.index = index
        self.chunking = chunking
        self.on_removed = on_removed
        self._hashes: dict[str, str] = {}

    def run(self, docs: Iterable[Document], budget: int, progress: bool) -> IngestReport:
        """Plan and commit ``docs`` in batches of about ``budget`` passage tokens (hold the writer lock).

        Documents are planned (chunked, tokenized) a window ahead of encoding, so the progress bar counts
        passages encoded of passages to encode, with tokens/s; each batch is committed as soon as it is
        encoded. A window is ``WINDOW_BATCHES`` batches (the bar's total grows if the input is longer).
        """
        from tqdm.auto import tqdm

        report = IngestReport()
        start = time.perf_counter()
        documents = iter(docs)
        held: list[Document] = []  # a document whose id repeats in the window waits for the next window
        with tqdm(desc="encode", unit="passage", total=0, disable=not progress, file=sys.stderr) as bar:
            self.ensure_prefix_block()
            while True:
                window, tokens, ids = [], 0, set()
                for doc in itertools.chain(held, documents):
                    held = []
                    validate_document(doc)
                    if doc.doc_id in ids:  # NOTE: the later one must see the earlier one committed
                        held = [doc]
                        break
                    ids.add(doc.doc_id)
                    planned = self.plan(doc, report)
                    if planned is not None:
                        window.append(planned)
                        tokens += planned.token_count
                        if tokens >= budget * WINDOW_BATCHES:
                            break
                if not window and not held:
                    break
                bar.total += len({p.key for d in window for p in d.passages if not self.kv.contains(p.key)})
                bar.refresh()
                batch: list[PlannedDocument] = []
                for planned in window:
                    batch.append(planned)
                    if sum(p.token_count for p in batch) >= budget:
                        self.commit(batch, report, bar, start)
                        batch = []
                self.commit(batch, report, bar, start)
        report.seconds = time.perf_counter() - start
        return report

    def ensure_prefix_block(self) -> None:
        """Encode block 0 (instruction header) at ingest too, so the first question finds it cached."""
        engine = self.engine
        text = engine.template.render_prefix()
        if not text:
            return
        ids = engine.prefix_ids()
        key = engine.key_of(ids)
        if not self.kv.contains(key):
            engine.source_blocks([ids], [text], store=self.kv)
        mid = registry.id_of(engine)
        if not any(m["id"] == mid and m["prefix_block_key"] == key for m in self.docstore.models()):
            with self.docstore.transaction() as tx:
                tx.set_model_prefix(mid, key)

    def plan(self, doc: Document, report: IngestReport) -> PlannedDocument | None:
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
        twin = self._hashes.get(content_hash) or self.docstore.document_with_hash(content_hash)
        if existing is None and twin is not None and twin != doc_id:
            report.documents_skipped += 1
            report.warnings.append(f"skipped document {doc_id!r}: same content as document {twin!r}")
            return None
        self._hashes[content_hash] = doc_id
        engine = self.engine
        passages = []
        for index, chunk in enumerate(chunk_text(doc.text, engine.tokenizer, self.chunking["max_tokens"],
                                                 self.chunking["overlap"])):
            rendered = engine.template.render_passage(Passage(chunk.text, doc.title))
            ids = tuple(engine.template.tokenize(engine.tokenizer, rendered))
            passages.append(PlannedPassage(f"{doc_id}#{index}", index, chunk.text, rendered, ids, engine.key_of(ids),
                                           chunk.start, chunk.end))
        longest = max(p.token_count for p in passages)
        if engine.max_positions is not None and longest > engine.max_positions:
            raise PromptTooLongError(f"a passage block of document {doc_id!r} has {longest} tokens, the model accepts "
                                     f"at most {engine.max_positions} positions; ingest with fewer chunk tokens")
        return PlannedDocument(doc, existing is not None, tuple(passages))

    def commit(self, batch: list[PlannedDocument], report: IngestReport, bar=None, start: float = 0.0) -> None:
        """KV files first, then one docstore transaction, then the in-memory index. ``bar`` (tqdm) counts
        passages encoded, in steps of one encoder budget."""
        if not batch:
            return
        todo: dict[str, PlannedPassage] = {}
        for planned in batch:
            for p in planned.passages:
                if p.key in todo:
                    continue
                if self.kv.contains(p.key):
                    report.blocks_reused += 1
                else:
                    todo[p.key] = p
        items = collections.deque(todo.values())
        step = max(1, self.engine.encoder.token_budget)
        while items:
            part, tokens = [], 0
            while items and (not part or tokens + items[0].token_count <= step):
                tokens += items[0].token_count
                part.append(items.popleft())
            # NOTE: raises StoreWriteError (e.g. disk full) before anything of the batch is committed.
            blocks, _ = self.engine.source_blocks([p.token_ids for p in part], [p.rendered for p in part],
                                                  store=self.kv)
            report.blocks_encoded += len(blocks)
            report.tokens_encoded += sum(b.num_tokens for b in blocks)
            del blocks
            if bar is not None:
                bar.update(len(part))
                bar.set_postfix_str(f"{report.tokens_encoded / max(time.perf_counter() - start, 1e-9):.0f} tokens/s")
        flat = [(planned, p) for planned in batch for p in planned.passages]
        vectors = self.embedder().embed([embed_text(planned.doc.title, p.text) for planned, p in flat])
        removed: list[tuple[int, set[str]]] = []
        added_ids: list[int] = []
        try:
            with self.docstore.transaction() as tx:
                row = 0
                for planned in batch:
                    doc = planned.doc
                    if planned.update:
                        removed += tx.delete_document(doc.doc_id)
                    rows = []
                    for p in planned.passages:
                        metadata = {**doc.metadata, "chunk_index": p.idx, "char_start": p.start, "char_end": p.end}
                        rows.append(NewPassage(p.id, doc.doc_id, p.idx, doc.title, p.text, metadata, p.start, p.end,
                                               p.token_count, p.key, vectors[row]))
                        row += 1
                    added_ids += tx.insert_document(doc.doc_id, doc.content_hash, doc.title, doc.source,
                                                    doc.metadata, rows, len(doc.text), registry.id_of(self.engine))
                tx.bump_version()
        except sqlite3.Error as e:
            message = (f"expected to commit {len(batch)} documents to {Path(self.docstore.path)}, found SQLite "
                       f"error: {e}; nothing of this batch was committed, the knowledge base is unchanged by it")
            if "full" in str(e).lower():
                raise StoreWriteError(28, message + "; free disk space and re-run") from e
            raise KnowledgeBaseError(message) from e
        for planned in batch:
            if planned.update:
                report.documents_updated += 1
            else:
                report.documents_added += 1
        report.passages_added += len(added_ids)
        report.passages_removed += len(removed)
        with self.index.lock:
            self.index.remove([vec_id for vec_id, _ in removed])
            self.index.add(added_ids, vectors)
        self.on_removed({key for _, keys in removed for key in keys})
