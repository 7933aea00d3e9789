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

SCHEMA_VERSION = 2

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

# NOTE: schema 2: KV is kept per model. A passage has one block key per model the knowledge base knows
# (``passages.block_key`` is the key of the model that ingested it, also listed in model_blocks).
_MODELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    template_version TEXT NOT NULL,
    template TEXT,
    name TEXT,
    kv_dtype TEXT,
    prefix_block_key TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS model_blocks (
    model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    vec_id INTEGER NOT NULL REFERENCES passages(vec_id) ON DELETE CASCADE,
    block_key TEXT NOT NULL,
    token_count INTEGER NOT NULL,
    PRIMARY KEY (model_id, vec_id)
);
CREATE INDEX IF NOT EXISTS model_blocks_key ON model_blocks(block_key);
"""


def model_id(fingerprint: str, template_version: str) -> str:
    """The id of a model's KV in a knowledge base: block keys depend on both."""
    return f"{fingerprint}/{template_version}"


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
        # NOTE: only a new (or older-schema) database is written to here: opening a current one takes no lock.
        if self._conn().execute("SELECT 1 FROM sqlite_master WHERE name = 'passages'").fetchone() is None:
            with self.transaction() as tx:
                tx.executescript_safe(_SCHEMA + _MODELS_SCHEMA)
                tx.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                           (str(SCHEMA_VERSION),))
                tx.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('version', '0')")
        if self.get_meta("schema_version") == "1":
            self._migrate_1_to_2()
        found = self.get_meta("schema_version")
        if found != str(SCHEMA_VERSION):
            self.close()
            raise KnowledgeBaseError(f"expected docstore schema version {SCHEMA_VERSION} in {self.path}, found "
                                     f"{found!r}; use a matching blockrag version")

    def _migrate_1_to_2(self) -> None:
        """Schema 1 kept one model's keys in ``passages``: list that model in ``models`` and its keys."""
        with self.transaction() as tx:
            if tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] != "1":
                return  # another process migrated it meanwhile
            tx.executescript_safe(_MODELS_SCHEMA)
            meta = {row[0]: row[1] for row in tx.execute("SELECT key, value FROM meta")}
            if meta.get("fingerprint"):
                mid = model_id(meta["fingerprint"], meta.get("template_version", ""))
                tx.add_model(mid, meta["fingerprint"], meta.get("template_version", ""), meta.get("template"),
                             meta.get("model"), meta.get("kv_dtype"))
                tx.set_model_prefix(mid, meta.get("prefix_block_key", ""))
                tx.execute("INSERT INTO model_blocks(model_id, vec_id, block_key, token_count) "
                           "SELECT ?, vec_id, block_key, token_count FROM passages", (mid,))
            tx.set_meta("schema_version", "2")

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

    def passages(self, vec_ids: Iterable[int], model: str | None = None) -> dict[int, PassageRow]:
        """Passages by vec_id; block key and token count are those of ``model`` (a model id; default: the
        first model), or the ingesting model's where that model has none yet."""
        ids = [int(i) for i in vec_ids]
        if not ids:
            return {}
        if model is None:
            first = self._conn().execute("SELECT id FROM models ORDER BY seq LIMIT 1").fetchone()
            model = first[0] if first is not None else ""
        marks = ",".join("?" * len(ids))
        rows = self._conn().execute(
            "SELECT p.vec_id, p.id, p.doc_id, p.title, p.text, p.metadata, "
            "COALESCE(m.token_count, p.token_count) AS token_count, COALESCE(m.block_key, p.block_key) AS block_key, "
            "d.source FROM passages p JOIN documents d ON d.id = p.doc_id "
            "LEFT JOIN model_blocks m ON m.vec_id = p.vec_id AND m.model_id = ? "
            f"WHERE p.vec_id IN ({marks})", [model, *ids]).fetchall()
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
        """Block keys of passages, for every model the knowledge base knows."""
        return {row[0] for row in self._conn().execute("SELECT DISTINCT block_key FROM model_blocks")}

    def ingested_keys(self) -> set[str]:
        """Block keys written at ingest (by the model that ingested each passage, while it is known): their KV
        files exist once the passage is committed. Other models' blocks are encoded when first needed."""
        return {row[0] for row in self._conn().execute(
            "SELECT DISTINCT p.block_key FROM passages p JOIN model_blocks m ON m.vec_id = p.vec_id AND "
            "m.block_key = p.block_key")}

    def pinned_keys(self) -> set[str]:
        """Instruction (block 0) keys of every known model: kept without a passage referencing them."""
        conn = self._conn()
        return {row[0] for row in conn.execute("SELECT prefix_block_key FROM models")} - {""}

    def needs(self, key: str) -> bool:
        """Whether ``key`` is in ``referenced_keys() | pinned_keys()`` (``BlockCensus.needed``), by one indexed
        lookup instead of building the sets."""
        return bool(self._conn().execute(
            "SELECT EXISTS (SELECT 1 FROM model_blocks WHERE block_key = ?) OR "
            "EXISTS (SELECT 1 FROM models WHERE prefix_block_key = ?)", (key, key)).fetchone()[0])

    def key_fingerprints(self) -> dict[str, str]:
        """Model fingerprint of every referenced or pinned block key."""
        conn = self._conn()
        out = {row[0]: row[1] for row in conn.execute(
            "SELECT m.block_key, o.fingerprint FROM model_blocks m JOIN models o ON o.id = m.model_id")}
        out.update({row[0]: row[1] for row in conn.execute(
            "SELECT prefix_block_key, fingerprint FROM models WHERE prefix_block_key != ''")})
        return out

    def model_keys(self) -> dict[str, set[str]]:
        """Distinct block keys per model id."""
        out: dict[str, set[str]] = {}
        for row in self._conn().execute("SELECT DISTINCT model_id, block_key FROM model_blocks"):
            out.setdefault(row[0], set()).add(row[1])
        for row in self._conn().execute("SELECT id, prefix_block_key FROM models WHERE prefix_block_key != ''"):
            out.setdefault(row[0], set()).add(row[1])
        return out

    def block_tokens(self, model: str) -> dict[str, int]:
        """Token count of each of a model's passage block keys."""
        return {row[0]: row[1] for row in self._conn().execute(
            "SELECT block_key, token_count FROM model_blocks WHERE model_id = ?", (model,))}

    def models(self) -> list[dict[str, Any]]:
        """Models the knowledge base holds KV for, in the order they were added (the first is the default)."""
        rows = self._conn().execute("SELECT o.*, (SELECT COUNT(*) FROM model_blocks m WHERE m.model_id = o.id) "
                                    "AS passages FROM models o ORDER BY seq").fetchall()
        return [{k: row[k] for k in row.keys() if k != "seq"} for row in rows]

    def passages_without(self, model: str) -> list[sqlite3.Row]:
        """(vec_id, title, text) of passages with no block key for ``model`` yet."""
        return self._conn().execute(
            "SELECT vec_id, title, text FROM passages p WHERE NOT EXISTS (SELECT 1 FROM model_blocks m "
            "WHERE m.vec_id = p.vec_id AND m.model_id = ?) ORDER BY vec_id", (model,)).fetchall()

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

    def delete_document(self, doc_id: str) -> list[tuple[int, set[str]]]:
        """Remove a document and its passages; returns each removed passage's vec_id and its block keys (of
        every model)."""
        removed: dict[int, set[str]] = {}
        for row in self.conn.execute("SELECT vec_id, block_key FROM passages WHERE doc_id = ?", (doc_id,)):
            removed[row[0]] = {row[1]}
        for row in self.conn.execute("SELECT m.vec_id, m.block_key FROM model_blocks m JOIN passages p ON "
                                     "p.vec_id = m.vec_id WHERE p.doc_id = ?", (doc_id,)):
            removed[row[0]].add(row[1])
        self.conn.execute("DELETE FROM model_blocks WHERE vec_id IN (SELECT vec_id FROM passages WHERE doc_id = ?)",
                          (doc_id,))
        self.conn.execute("DELETE FROM passages WHERE doc_id = ?", (doc_id,))
        self.conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        return list(removed.items())

    def insert_document(self, doc_id: str, content_hash: str, title: str | None, source: str | None,
                        metadata: dict[str, Any], passages: list[NewPassage], num_chars: int,
                        model: str | None = None) -> list[int]:
        """Insert a document and its passages (their block keys are ``model``'s); returns the passages' new
        vec_ids, in order."""
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
            if model is not None:
                self.set_model_block(model, vec_ids[-1], p.block_key, p.token_count)
        return vec_ids

    def add_model(self, mid: str, fingerprint: str, template_version: str, template: str | None, name: str | None,
                  kv_dtype: str | None) -> None:
        self.conn.execute("INSERT INTO models(id, fingerprint, template_version, template, name, kv_dtype) "
                          "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                          (mid, fingerprint, template_version, template, name, kv_dtype))

    def set_model_prefix(self, mid: str, key: str) -> None:
        self.conn.execute("UPDATE models SET prefix_block_key = ? WHERE id = ?", (key, mid))

    def set_model_block(self, mid: str, vec_id: int, block_key: str, token_count: int) -> None:
        self.conn.execute("INSERT INTO model_blocks(model_id, vec_id, block_key, token_count) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT(model_id, vec_id) DO UPDATE SET block_key = excluded.block_key, "
                          "token_count = excluded.token_count", (mid, vec_id, block_key, token_count))

    def forget_model(self, mid: str) -> None:
        """Drop a model's block keys (its KV files become orphans for ``gc``)."""
        self.conn.execute("DELETE FROM model_blocks WHERE model_id = ?", (mid,))
        self.conn.execute("DELETE FROM models WHERE id = ?", (mid,))
