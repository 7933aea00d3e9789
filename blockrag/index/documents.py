"""Documents and their loaders: ``.txt``, ``.md``, ``.html``, ``.pdf`` (with pypdf), ``.jsonl`` files and
directories (recursive, glob filters).

Loaders yield ``Document`` objects and report what they skipped (empty, binary or non-UTF-8 files, bad
JSONL lines) through a list of warnings, so a large ingest is not stopped by one bad file; paths that do
not exist are refused up front.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockrag.index.errors import DocumentError

logger = logging.getLogger("blockrag.index")

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One document to ingest.

    Attributes:
        text: the full text.
        id: stable id used for upserts and deletes; default: a hash of title and text (so identical
            content dedupes).
        title: shown with each of its passages (and part of each passage block).
        source: where it came from (a path, a URL), for citations.
        metadata: JSON-safe extra fields, copied to every passage.
    """

    text: str
    id: str | None = None
    title: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """sha256 over title and text: what decides whether a re-ingested document changed."""
        h = hashlib.sha256()
        h.update((self.title or "").encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(self.text.encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    @property
    def doc_id(self) -> str:
        return self.id if self.id is not None else "sha256:" + self.content_hash[:24]


def validate_document(doc: Document) -> None:
    """Refuse what cannot be stored: non-string fields, empty ids, metadata that is not JSON-safe."""
    if not isinstance(doc, Document):
        raise DocumentError(f"expected a blockrag.index.Document, found {type(doc).__name__}")
    if not isinstance(doc.text, str):
        raise DocumentError(f"expected document text to be str, found {type(doc.text).__name__} (id {doc.id!r})")
    if doc.id is not None and (not isinstance(doc.id, str) or not doc.id.strip()):
        raise DocumentError(f"expected a non-empty string document id or None, found {doc.id!r}")
    for name in ("title", "source"):
        value = getattr(doc, name)
        if value is not None and not isinstance(value, str):
            raise DocumentError(f"expected document {name} to be str or None, found {type(value).__name__}")
    if not isinstance(doc.metadata, dict):
        raise DocumentError(f"expected document metadata to be a dict, found {type(doc.metadata).__name__}")
    try:
        json.dumps(doc.metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DocumentError(f"expected JSON-safe metadata for document {doc.doc_id!r}, found: {e}") from None


# --- files ---------------------------------------------------------------------------------------

def _read_text(path: Path, warnings: list[str]) -> str | None:
    """UTF-8 text of a file, or None (with a warning) if it is empty, binary or not UTF-8."""
    data = path.read_bytes()
    if not data.strip():
        warnings.append(f"skipped {path}: the file is empty")
        return None
    if b"\x00" in data[:_SNIFF_BYTES]:
        warnings.append(f"skipped {path}: expected a UTF-8 text file, found binary data (NUL bytes)")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        warnings.append(f"skipped {path}: expected UTF-8 text, found an invalid byte at offset {e.start}")
        return None
    return text


def _first_line_title(text: str) -> str | None:
    """The first line of a plain text file when it reads as a title: short, no sentence punctuation at its
    end, and a blank line after it."""
    lines = text.lstrip("\n").splitlines()
    if len(lines) < 3 or lines[1].strip():
        return None
    first = lines[0].strip()
    if not first or len(first) > 80 or len(first.split()) > 12 or first[-1] in ".,;:!?":
        return None
    return first


def _markdown_title(text: str) -> str | None:
    for line in text.splitlines()[:20]:
        if line.startswith("# "):
            return line[2:].strip() or None
    return None


def load_file(path: str | os.PathLike, warnings: list[str] | None = None) -> Iterator[Document]:
    """Documents of one file: one per text/markdown file, one per JSONL line.

    Text, HTML and PDF files get id = source = the absolute path, and a title: the first markdown heading,
    the HTML <title> (or first <h1>), the PDF's title, a plain text file's first line when it reads as a
    title (short, no final punctuation, a blank line after it), else the file name. HTML is reduced to its
    visible text (standard library parser); PDF needs the optional pypdf (``blockrag[pdf]``; skipped with a
    warning without it). JSONL lines are objects with "text" (required), "id", "title", "source"; other fields become
    metadata. Bad lines are skipped with a warning naming the line.
    """
    warnings = warnings if warnings is not None else []
    path = Path(path)
    if not path.is_file():
        raise DocumentError(f"expected a readable file, found nothing at {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _load_jsonl(path, warnings)
        return
    source = str(path.resolve())
    if suffix in PDF_SUFFIXES:
        from blockrag.index.markup import pdf_text

        try:
            text, title = pdf_text(path)
        except (ImportError, ValueError) as e:
            warnings.append(f"skipped {path}: {e}")
            return
        if not text.strip():
            warnings.append(f"skipped {path}: the PDF has no extractable text (scanned pages need OCR first)")
            return
        yield Document(text=text, id=source, title=title or path.stem, source=source)
        return
    text = _read_text(path, warnings)
    if text is None:
        return
    if suffix in HTML_SUFFIXES:
        from blockrag.index.markup import html_text

        text, title = html_text(text)
        if not text:
            warnings.append(f"skipped {path}: the HTML has no visible text")
            return
    elif suffix in (".md", ".markdown"):
        title = _markdown_title(text)
    else:
        title = _first_line_title(text)
    yield Document(text=text, id=source, title=title or path.stem, source=source)


def _load_jsonl(path: Path, warnings: list[str]) -> Iterator[Document]:
    text = _read_text(path, warnings)
    if text is None:
        return
    source = str(path.resolve())
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            warnings.append(f"skipped {where}: expected a JSON object, found invalid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            warnings.append(f"skipped {where}: expected a JSON object, found {type(record).__name__}")
            continue
        body = record.get("text")
        if not isinstance(body, str) or not body.strip():
            warnings.append(f"skipped {where}: expected a non-empty string field 'text', found {body!r:.40}")
            continue
        doc_id = record.get("id")
        title = record.get("title")
        metadata = {k: v for k, v in record.items() if k not in ("id", "title", "text", "source")}
        doc = Document(
            text=body,
            id=str(doc_id) if doc_id is not None else None,
            title=str(title) if title is not None else None,
            source=str(record.get("source") or f"{source}:{number}"),
            metadata=metadata,
        )
        yield doc


def _matches(relative: str, patterns: list[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        if fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(name, pattern):
            return True
        # "**/x" also matches x at the top level.
        if pattern.startswith("**/") and fnmatch.fnmatchcase(relative, pattern[3:]):
            return True
    return False


def iter_files(root: Path, glob: str | Iterable[str] | None = None) -> Iterator[Path]:
    """Files under a directory, recursively, sorted; hidden entries skipped.

    Without ``glob``, files with a supported suffix; with it, files whose path relative to root (or whose
    name) matches one of the patterns, e.g. ``"*.md"``, ``"docs/**/*.txt"``.
    """
    patterns = [glob] if isinstance(glob, str) else list(glob) if glob is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            relative = path.relative_to(root).as_posix()
            if patterns is None:
                if path.suffix.lower() in SUPPORTED_SUFFIXES:
                    yield path
            elif _matches(relative, patterns):
                yield path


def load_paths(paths: str | os.PathLike | Iterable[str | os.PathLike], glob: str | Iterable[str] | None = None,
               warnings: list[str] | None = None) -> Iterator[Document]:
    """Documents of files and directories (recursive). Every path must exist; this is checked at the call,
    before anything is loaded; documents are then read lazily.

    Raises:
        DocumentError: no path given, or a path that does not exist.
    """
    warnings = warnings if warnings is not None else []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise DocumentError("expected at least one file or directory, found none")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DocumentError(f"expected existing files or directories, found nothing at {', '.join(missing)}")
    return _iter_paths(paths, glob, warnings)


def _iter_paths(paths: list[Path], glob, warnings: list[str]) -> Iterator[Document]:
    for path in paths:
        if path.is_dir():
            count = 0
            for file in iter_files(path, glob):
                count += 1
                yield from load_file(file, warnings)
            if count == 0:
                wanted = glob if glob is not None else " ".join(f"*{s}" for s in SUPPORTED_SUFFIXES)
                warnings.append(f"no files matching {wanted} under {path}")
        else:
            yield from load_file(path, warnings)
