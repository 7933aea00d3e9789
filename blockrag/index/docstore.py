"""Docstore: documents and passages in SQLite, the knowledge base's source of truth.

Every change is one transaction (``with docstore.transaction() as tx``), so a crash leaves either all of
a batch or none of it. Passages keep their embedding, so the vector index can always be rebuilt or patched
from here. ``vec_id`` (the FAISS id) is an AUTOINCREMENT key: ids are never reused, so a stale vector
index can never attach an old vector to a new passage.

Each thread gets its own connection (WAL mode: readers do not block the writer or each other).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blockrag.index.errors import KnowledgeBaseError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    title TEXT,
    source TEXT,
    metadata TEXT NOT NULL,
    num_passages INTEGER NOT NULL,
    num_chars INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_hash ON documents(content_hash);
CREATE TABLE IF NOT EXISTS passages (
    vec_id INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    title TEXT,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    token_count INTEGER NOT NULL,
    block_key TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_doc ON passages(doc_id);
CREATE INDEX IF NOT EXISTS passages_block ON passages(block_key);
"""


@dataclass(frozen=True)
class PassageRow:
    """A stored passage, as read back (without its embedding)."""

    vec_id: int
    id: str
    doc_id: str
    title: str | None
    text: str
    metadata: dict[str, Any]
    token_count: int
    block_key: str
    source: str | None


@dataclass(frozen=True)
class NewPassage:
    """A passage to insert."""

    id: str
    doc_id: str
    idx: int
    title: str | None
    text: str
    metadata: dict[str, Any]
    char_start: int
    char_end: int
    token_count: int
    block_key: str
    embedding: np.ndarray  # (dim,) float32


class Docstore:
    """SQLite file with documents, passages (and their embeddings) and key/value meta.

    Args:
        path: the database file.
        max_page_count: optional cap on the database size in pages (SQLite reports "database or disk is
            full" past it); used to exercise full-disk handling.
    """

    def __init__(self, path: str | Path, *, max_page_count: int | None = None) -> None:
        self.path = Path(path)
        self.max_page_count = max_page_count
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self._init_schema()
        except sqlite3.DatabaseError as e:
            self.close()
            raise KnowledgeBaseError(f"expected an SQLite docstore at {self.path}, found an unreadable file ({e}); "
                                     "restore it from a backup or rebuild the knowledge base") from e

    def _init_schema(self) -> None:
        # NOTE: only a new database is written to here: opening an existing one takes no write lock.
        if self._conn().execute("SELECT 1 FROM sqlite_master WHERE name = 'passages'").fetchone() is None:
            with self.transaction() as tx:
                tx.executescript_safe(_SCHEMA)
                tx.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                           (str(SCHEMA_VERSION),))
                tx.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('version', '0')")
        found = self.get_meta("schema_version")
        if found != str(SCHEMA_VERSION):
            self.close()
            raise KnowledgeBaseError(f"expected docstore schema version {SCHEMA_VERSION} in {self.path}, found "
                                     f"{found!r}; use a matching blockrag version")

    # --- connections -----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if self.max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count={int(self.max_page_count)}")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        """One write transaction (BEGIN IMMEDIATE); committed on success, rolled back on any exception."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield _Tx(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # --- reads -----------------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        return {row["key"]: row["value"] for row in self._conn().execute("SELECT key, value FROM meta")}

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row is not None else default

    def version(self) -> int:
        return int(self.get_meta("version", "0"))

    def document(self, doc_id: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["metadata"] = json.loads(out["metadata"])
        return out

    def document_with_hash(self, content_hash: str) -> str | None:
        row = self._conn().execute("SELECT id FROM documents WHERE content_hash = ? LIMIT 1",
                                   (content_hash,)).fetchone()
        return row["id"] if row is not None else None

    def document_ids(self) -> list[str]:
        return [row["id"] for row in self._conn().execute("SELECT id FROM documents ORDER BY id")]

    def passages(self, vec_ids: Iterable[int]) -> dict[int, PassageRow]:
        ids = [int(i) for i in vec_ids]
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._conn().execute(
            "SELECT p.vec_id, p.id, p.doc_id, p.title, p.text, p.metadata, p.token_count, p.block_key, d.source "
            f"FROM passages p JOIN documents d ON d.id = p.doc_id WHERE p.vec_id IN ({marks})", ids).fetchall()
        return {row["vec_id"]: PassageRow(row["vec_id"], row["id"], row["doc_id"], row["title"], row["text"],
                                          json.loads(row["metadata"]), row["token_count"], row["block_key"],
                                          row["source"]) for row in rows}

    def passage(self, passage_id: str) -> PassageRow | None:
        row = self._conn().execute("SELECT vec_id FROM passages WHERE id = ?", (passage_id,)).fetchone()
        return self.passages([row["vec_id"]]).get(row["vec_id"]) if row is not None else None

    def iter_passages(self) -> Iterator[sqlite3.Row]:
        """(vec_id, title, text, block_key, token_count) of every passage, in vec_id order."""
        yield from self._conn().execute("SELECT vec_id, title, text, block_key, token_count FROM passages "
                                        "ORDER BY vec_id").fetchall()

    def vec_ids(self) -> set[int]:
        return {row[0] for row in self._conn().execute("SELECT vec_id FROM passages")}

    def embeddings(self, vec_ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), vectors (N, dim)) for the given ids (all if None)."""
        conn = self._conn()
        if vec_ids is None:
            rows = conn.execute("SELECT vec_id, embedding FROM passages ORDER BY vec_id").fetchall()
        else:
            ids = sorted(int(i) for i in vec_ids)
            rows = []
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                rows += conn.execute(f"SELECT vec_id, embedding FROM passages WHERE vec_id IN "
                                     f"({','.join('?' * len(part))})", part).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        ids_out = np.array([row[0] for row in rows], dtype=np.int64)
        vectors = np.stack([np.frombuffer(row[1], dtype=np.float32) for row in rows])
        return ids_out, vectors

    def referenced_keys(self) -> set[str]:
        return {row[0] for row in self._conn().execute("SELECT DISTINCT block_key FROM passages")}

    def counts(self) -> dict[str, int]:
        conn = self._conn()
        documents = conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        passages, tokens = conn.execute("SELECT COUNT(*), COALESCE(SUM(token_count), 0) FROM passages").fetchone()
        blocks = conn.execute("SELECT COUNT(DISTINCT block_key) FROM passages").fetchone()[0]
        return {"documents": documents, "passages": passages, "passage_tokens": tokens, "distinct_blocks": blocks}


class _Tx:
    """Writes inside one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params=()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executescript_safe(self, script: str) -> None:
        # NOTE: executescript() would COMMIT the open transaction; run the statements one by one instead.
        for statement in script.split(";"):
            if statement.strip():
                self.conn.execute(statement)

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                          "excluded.value", (key, value))

    def bump_version(self) -> int:
        self.conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])

    def document_exists(self, doc_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone() is not None

    def delete_document(self, doc_id: str) -> list[tuple[int, str]]:
        """Remove a document and its passages; returns the removed passages' (vec_id, block_key)."""
        removed = [(row[0], row[1]) for row in
                   self.conn.execute("SELECT vec_id, block_key FROM passages WHERE doc_id = ?", (doc_id,))]
        self.conn.execute("DELETE FROM passages WHERE doc_id = ?", (doc_id,))
        self.conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        return removed

    def insert_document(self, doc_id: str, content_hash: str, title: str | None, source: str | None,
                        metadata: dict[str, Any], passages: list[NewPassage], num_chars: int) -> list[int]:
        """Insert a document and its passages; returns the passages' new vec_ids, in order."""
        self.conn.execute("INSERT INTO documents(id, content_hash, title, source, metadata, num_passages, num_chars) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (doc_id, content_hash, title, source, json.dumps(metadata), len(passages), num_chars))
        vec_ids = []
        for p in passages:
            cursor = self.conn.execute(
                "INSERT INTO passages(id, doc_id, idx, title, text, metadata, char_start, char_end, token_count, "
                "block_key, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (p.id, p.doc_id, p.idx, p.title, p.text, json.dumps(p.metadata), p.char_start, p.char_end,
                 p.token_count, p.block_key, np.ascontiguousarray(p.embedding, dtype=np.float32).tobytes()))
            vec_ids.append(int(cursor.lastrowid))
        return vec_ids

    def set_block(self, vec_id: int, block_key: str, token_count: int) -> None:
        self.conn.execute("UPDATE passages SET block_key = ?, token_count = ? WHERE vec_id = ?",
                          (block_key, token_count, vec_id))

    def key_referenced(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM passages WHERE block_key = ? LIMIT 1", (key,)).fetchone() is not None
