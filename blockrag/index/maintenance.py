"""Maintenance of a knowledge base: verify, gc, stats, and deleting documents with their KV files.

Which KV files a knowledge base still needs is decided in one place, ``BlockCensus``: a file is *referenced*
by a passage for one of the models the knowledge base knows, *pinned* (a model's instruction block 0) or
an *orphan* (neither, so ``gc`` may delete it). Another known model's KV is never an orphan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockrag.errors import KVBlockMismatchError
from blockrag.index import layout
from blockrag.index.docstore import Docstore
from blockrag.index.mirror import IndexMirror
from blockrag.store.disk import DiskKVStore, decode_block
from blockrag.store.errors import CorruptBlockError


@dataclass(frozen=True)
class BlockCensus:
    """The KV files a knowledge base needs, against the files it has."""

    referenced: frozenset[str]  # block keys of passages, for every model the knowledge base knows
    pinned: frozenset[str]      # blocks kept without a passage (each model's instruction block)
    ingested: frozenset[str] = frozenset()  # referenced keys whose files ingest wrote (the rest: encoded lazily)
    on_disk: frozenset[str] | None = None  # None: the KV directory was not listed

    @classmethod
    def of(cls, docstore: Docstore, kv: DiskKVStore | None = None) -> BlockCensus:
        on_disk = frozenset(kv.keys()) if kv is not None else None
        ingested = frozenset(docstore.ingested_keys()) if kv is not None else frozenset()
        return cls(frozenset(docstore.referenced_keys()), frozenset(docstore.pinned_keys()), ingested, on_disk)

    @property
    def needed(self) -> frozenset[str]:
        return self.referenced | self.pinned

    @property
    def missing(self) -> frozenset[str]:
        """Keys ingest wrote whose KV file is gone (another model's block not encoded yet is not missing)."""
        return self.ingested - self._files

    @property
    def orphans(self) -> frozenset[str]:
        """KV files nothing needs."""
        return self._files - self.needed

    @property
    def _files(self) -> frozenset[str]:
        if self.on_disk is None:
            raise ValueError("this census did not list the KV files")
        return self.on_disk


def collect(docstore: Docstore, kv: DiskKVStore, keys: set[str]) -> int:
    """Delete the KV files of ``keys`` that nothing needs any more (after the commit that dropped them; hold
    the writer lock). Returns the number of files deleted.

    Only ``kv``: an engine's memory copy of such a block is still the right KV for its text (keys are content
    hashes) and its LRU drops it; deleting through the engine's store would reach other knowledge bases' disks.
    """
    if not keys:
        return 0
    return sum(bool(kv.delete(key)) for key in keys - BlockCensus.of(docstore).needed)


def verify(path: Path, docstore: Docstore, kv: DiskKVStore, index: IndexMirror, deep: bool) -> dict[str, Any]:
    """Consistency report (read-only); see ``KnowledgeBase.verify``."""
    census = BlockCensus.of(docstore, kv)
    corrupt: list[str] = []
    if deep:
        fingerprints = docstore.key_fingerprints()
        for key in sorted(census.referenced & census.on_disk):
            try:
                decode_block(kv.path_of(key).read_bytes(), key=key, fingerprint=fingerprints.get(key))
            except (CorruptBlockError, KVBlockMismatchError, FileNotFoundError):
                corrupt.append(key)
    saved_ids = index.saved_ids()
    in_db = docstore.vec_ids()
    temps = [str(p) for p in kv.temp_files()] + [str(p) for p in layout.temp_files(path)]
    report = {
        "passages": len(in_db),
        "missing_blocks": sorted(census.missing),
        "corrupt_blocks": corrupt,
        "orphan_blocks": sorted(census.orphans),
        "temp_files": temps,
        "index_missing": len(in_db - saved_ids),
        "index_extra": len(saved_ids - in_db),
    }
    report["ok"] = not (report["missing_blocks"] or corrupt)
    return report


def gc(docstore: Docstore, kv: DiskKVStore) -> int:
    """Delete KV files nothing needs; returns how many. Call while holding the writer lock."""
    return sum(bool(kv.delete(key)) for key in BlockCensus.of(docstore, kv).orphans)


def stats(docstore: Docstore, kv: DiskKVStore, manifest: dict[str, Any]) -> dict[str, Any]:
    """Counts and sizes from the docstore and the KV directory, with the manifest's settings."""
    usage = kv.usage()
    census = BlockCensus.of(docstore, kv)
    meta = docstore.meta()
    models = models_report(docstore, kv)
    return {
        "format_version": manifest["format_version"],
        **docstore.counts(),
        "kv_blocks": usage["blocks"],
        "kv_bytes": usage["bytes"],
        "blocks_missing": len(census.missing),
        "orphan_blocks": len(census.orphans),
        "kv_fp8": manifest["kv"]["fp8"],
        "kv_dtype": meta.get("kv_dtype"),
        "index": manifest["index"]["kind"],
        "embedder": dict(manifest["embedder"]),
        "chunking": dict(manifest["chunking"]),
        "model": layout.model_record(meta),
        "kv_bytes_per_token": models[0]["kv_bytes_per_token"] if models else None,
        "kv_bytes_per_passage": models[0]["kv_bytes_per_passage"] if models else None,
        "models": models,
        "kv_discarded": dict(kv.discarded),
    }


def models_report(docstore: Docstore, kv: DiskKVStore) -> list[dict[str, Any]]:
    """Per known model: name, fingerprint, template, KV dtype, passages with a block key, passage blocks on
    disk, their bytes, and bytes per token and per passage block (to plan disk: a model's KV grows with
    layers x KV heads x head size x dtype bytes per token)."""
    on_disk = set(kv.keys())
    out = []
    for m in docstore.models():
        tokens = {key: n for key, n in docstore.block_tokens(m["id"]).items() if key in on_disk}
        size = 0
        for key in tokens:
            try:
                size += kv.path_of(key).stat().st_size
            except FileNotFoundError:
                continue
        count, total = len(tokens), sum(tokens.values())
        out.append({"name": m["name"], "fingerprint": m["fingerprint"], "template": m["template"],
                    "kv_dtype": m["kv_dtype"], "passages": m["passages"], "blocks_stored": count, "kv_bytes": size,
                    "kv_bytes_per_token": round(size / total) if total else None,
                    "kv_bytes_per_passage": round(size / count) if count else None})
    return out


def delete_documents(docstore: Docstore, ids: list[str]) -> tuple[list[str], list[str], list[tuple[int, set[str]]]]:
    """Remove documents and their passages in one transaction.

    Returns:
        (found ids, missing ids, removed passages as (vec_id, block keys of every model)).
    """
    removed: list[tuple[int, set[str]]] = []
    found, missing = [], []
    with docstore.transaction() as tx:
        for doc_id in ids:
            if not tx.document_exists(doc_id):
                missing.append(doc_id)
                continue
            removed += tx.delete_document(doc_id)
            found.append(doc_id)
        tx.bump_version()
    return found, missing, removed
