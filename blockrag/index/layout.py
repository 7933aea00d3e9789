"""The on-disk layout of a knowledge base: which files it has, and its manifest.

A knowledge base is a directory::

    manifest.json      format version, embedder id and dimension, chunking, index kind, KV codec
    docstore.sqlite    documents and passages (with embeddings), model fingerprint: the source of truth
    index.faiss        vector index snapshot (patched from the docstore on open if it is behind)
    kv/                one safetensors file per passage block, named by its content key (DiskKVStore)
    .tmp/              temp files of atomic writes (removed by the next writer if their process died)
    .writer.lock       one writing process at a time (flock)

The manifest is written last when a knowledge base is created: a directory without one is not (yet) a
knowledge base. The docstore is authoritative; the manifest's model record mirrors it for people reading
the directory.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from blockrag.atomic import TEMP_PREFIX, atomic_write, pid_alive, temp_owner_pid
from blockrag.errors import InvalidInputError
from blockrag.index.errors import KnowledgeBaseError, NotAKnowledgeBaseError

FORMAT = "blockrag-kb"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCSTORE = "docstore.sqlite"
INDEX = "index.faiss"
KV_DIR = "kv"
TMP_DIR = ".tmp"
LOCK = ".writer.lock"
OWN_ENTRIES = frozenset({MANIFEST, DOCSTORE, DOCSTORE + "-wal", DOCSTORE + "-shm", DOCSTORE + "-journal", INDEX,
                         KV_DIR, TMP_DIR, LOCK})
MODEL_META = ("model", "fingerprint", "template", "template_version", "kv_dtype")


def model_record(meta: dict[str, str]) -> dict[str, Any]:
    """The recorded model (docstore meta) as the manifest and ``stats`` show it."""
    return {"name": meta.get("model"), "fingerprint": meta.get("fingerprint"), "template": meta.get("template"),
            "template_version": meta.get("template_version"), "kv_dtype": meta.get("kv_dtype")}


def models_record(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model the knowledge base holds KV for (the first is the default), for the manifest."""
    return [{"name": m["name"], "fingerprint": m["fingerprint"], "template": m["template"],
             "template_version": m["template_version"], "kv_dtype": m["kv_dtype"]} for m in models]


def new_manifest(embedder_id: str, embedder_dim: int, chunk_tokens: int, chunk_overlap: int, index: str,
                 fp8: bool, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "embedder": {"id": embedder_id, "dim": embedder_dim},
        "chunking": {"max_tokens": chunk_tokens, "overlap": chunk_overlap},
        "index": {"kind": index},
        "kv": {"fp8": bool(fp8)},
        "model": model,
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=2).encode(), tmp_dir=path / TMP_DIR)


def check_new_directory(path: Path) -> None:
    """Refuse a path that holds a knowledge base, is a file, or holds files of something else."""
    if (path / MANIFEST).exists():
        raise KnowledgeBaseError(f"expected a new directory, found a knowledge base already at {path}; "
                                 "open it with KnowledgeBase.open")
    if path.exists() and not path.is_dir():
        raise KnowledgeBaseError(f"expected a directory for the knowledge base, found a file at {path}")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_ENTRIES) if path.exists() else []
    if foreign:
        raise KnowledgeBaseError(f"expected an empty or new directory for a new knowledge base, found "
                                 f"{len(foreign)} other entries in {path} (e.g. {foreign[0]!r})")


def check_settings(chunk_tokens, chunk_overlap, index) -> None:
    """Refuse chunking and index settings a knowledge base cannot be created with."""
    from blockrag.index.vectors import KINDS

    if not isinstance(chunk_tokens, int) or chunk_tokens < 8:
        raise InvalidInputError(f"expected chunk_tokens >= 8, found {chunk_tokens!r}")
    if not isinstance(chunk_overlap, int) or not 0 <= chunk_overlap <= chunk_tokens // 2:
        raise InvalidInputError(f"expected 0 <= chunk_overlap <= chunk_tokens // 2, found {chunk_overlap!r}")
    if index not in KINDS:
        raise InvalidInputError(f"expected index kind in {KINDS}, found {index!r}")


def make_directories(path: Path) -> None:
    (path / TMP_DIR).mkdir(parents=True, exist_ok=True)
    (path / KV_DIR).mkdir(exist_ok=True)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the knowledge base at ``path``.

    Raises:
        NotAKnowledgeBaseError: no directory, no manifest, or not a blockrag manifest.
        KnowledgeBaseError: an unreadable manifest or another format version.
    """
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


def temp_files(path: Path) -> list[Path]:
    """Temp files of atomic writes in the knowledge base's own temp folder (not the KV store's)."""
    tmp = path / TMP_DIR
    return sorted(tmp.glob(TEMP_PREFIX + "*")) if tmp.is_dir() else []


def clean_temp(path: Path) -> int:
    """Remove temp files of processes that no longer run; returns how many were removed."""
    (path / TMP_DIR).mkdir(exist_ok=True)
    removed = 0
    for entry in temp_files(path):
        pid = temp_owner_pid(entry.name)
        if not (pid is not None and pid_alive(pid)):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
