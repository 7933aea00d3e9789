"""Text out of HTML (standard library parser) and PDF (``pypdf``, optional: ``pip install blockrag[pdf]``)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

_BLOCK_TAGS = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
                         "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dd", "dt", "hr"})
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "svg", "head"})


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: str | None = None
        self.heading: str | None = None
        self._skip = 0
        self._in_title = False
        self._in_h1 = False
        self._h1: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP_TAGS:
            self._skip += 1
        elif tag == "h1" and self.heading is None:
            self._in_h1 = True
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag == "h1" and self._in_h1:
            self._in_h1 = False
            self.heading = " ".join("".join(self._h1).split()) or None
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data) -> None:
        if self._in_title:
            self.title = " ".join(((self.title or "") + " " + data).split()) or None
            return
        if self._skip:
            return
        if self._in_h1:
            self._h1.append(data)
        self.parts.append(data)


def html_text(markup: str) -> tuple[str, str | None]:
    """(visible text with paragraphs kept, title from <title> or the first <h1>)."""
    parser = _TextParser()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    lines = [" ".join(line.split()) for line in text.splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text, parser.title or parser.heading


def pdf_text(path: Path) -> tuple[str, str | None]:
    """(text of every page, the document title if it has one). Needs ``pypdf``.

    Raises:
        ImportError: pypdf is not installed.
        ValueError: the file is not a readable PDF.
    """
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise ImportError("PDF documents need the optional package pypdf: pip install 'blockrag[pdf]'") from None
    try:
        reader = PdfReader(str(path))
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = reader.metadata.title if reader.metadata is not None else None
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"expected a readable PDF, found {type(e).__name__}: {e}") from None
    return "\n\n".join(p for p in pages if p), (str(title).strip() or None) if title else None
