"""Document loaders and the token-aware chunker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from blockrag.index import Document, DocumentError, chunk_text, load_paths
from blockrag.index.documents import iter_files, validate_document
from blockrag.testing import _CORPUS

CORPUS = Path(__file__).parent / "kb_corpus"


def covered(text: str, chunks) -> bool:
    """Every non-whitespace character of text lies in some chunk."""
    mask = bytearray(len(text))
    for c in chunks:
        mask[c.start:c.end] = b"\x01" * (c.end - c.start)
    return all(mask[i] or text[i].isspace() for i in range(len(text)))


# --- loaders -------------------------------------------------------------------------------------

def test_directory_is_loaded_recursively_with_titles_ids_and_metadata():
    warnings: list[str] = []
    docs = list(load_paths(CORPUS, warnings=warnings))
    assert warnings == []
    by_id = {d.doc_id: d for d in docs}
    assert len(docs) == 11  # 8 text/markdown files (2 in a subdirectory) + 3 JSONL records; questions.json ignored
    md = by_id[str((CORPUS / "notes" / "velorin.md").resolve())]
    assert md.title == "Velorin" and md.source == md.id and "migraine" in md.text
    txt = by_id[str((CORPUS / "duck.txt").resolve())]
    assert txt.title == "duck"
    record = by_id["dunmore"]
    assert record.title == "Dunmore tariff" and record.metadata == {"topic": "economics"}
    assert record.source.endswith("facts.jsonl:2")


def test_glob_filters_files_under_directories():
    md_only = list(load_paths(CORPUS, glob="*.md"))
    assert {Path(d.source).suffix for d in md_only} == {".md"} and len(md_only) == 4
    nested = list(load_paths(CORPUS, glob=["notes/*"]))
    assert sorted(Path(d.source).name for d in nested) == ["quartet.txt", "velorin.md"]
    assert [p.name for p in iter_files(CORPUS, "**/*.jsonl")] == ["facts.jsonl"]
    warnings: list[str] = []
    assert list(load_paths(CORPUS, glob="*.pdf", warnings=warnings)) == []
    assert "no files matching *.pdf" in warnings[0]


def test_missing_paths_are_refused_before_loading(tmp_path):
    with pytest.raises(DocumentError, match="found nothing at .*nope"):
        load_paths([CORPUS, tmp_path / "nope"])
    with pytest.raises(DocumentError, match="at least one"):
        load_paths([])


def test_empty_binary_and_non_utf8_files_are_skipped_with_warnings(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("  \n\n ")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "good.txt").write_text("fine text")
    warnings: list[str] = []
    docs = list(load_paths(tmp_path, warnings=warnings))
    assert [d.text for d in docs] == ["fine text"]
    joined = "\n".join(warnings)
    assert "empty.txt: the file is empty" in joined and "blank.md: the file is empty" in joined
    assert "image.txt: expected a UTF-8 text file, found binary data" in joined
    assert "latin1.txt: expected UTF-8 text, found an invalid byte at offset 3" in joined
    # The same holds for a file named explicitly.
    warnings.clear()
    assert list(load_paths(tmp_path / "image.txt", warnings=warnings)) == [] and len(warnings) == 1


def test_bad_jsonl_lines_are_skipped_with_their_line_number(tmp_path):
    lines = ['{"id": "a", "text": "alpha"}', "not json", "[1, 2]", '{"id": "b"}', '{"text": "  "}', "",
             '{"text": "no id", "extra": [1, {"x": null}]}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
    warnings: list[str] = []
    docs = list(load_paths(tmp_path / "d.jsonl", warnings=warnings))
    assert [d.text for d in docs] == ["alpha", "no id"]
    assert docs[1].id is None and docs[1].doc_id.startswith("sha256:")
    assert docs[1].metadata == {"extra": [1, {"x": None}]}
    assert [w.split(": ")[0].rsplit(":", 1)[1] for w in warnings] == ["2", "3", "4", "5"]


def test_document_validation_and_content_ids():
    a, b = Document("same text", title="T"), Document("same text", title="T", source="elsewhere")
    assert a.doc_id == b.doc_id  # identical content -> identical default id (dedupe)
    assert Document("same text", title="U").doc_id != a.doc_id
    for bad, message in [(Document(b"bytes"), "text to be str"), (Document("x", id=""), "non-empty string"),
                         (Document("x", metadata={"when": object()}), "JSON-safe"),
                         (Document("x", metadata={"n": float("nan")}), "JSON-safe"), ("plain str", "Document")]:
        with pytest.raises(DocumentError, match=message):
            validate_document(bad)


# --- chunker -------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens,overlap", [(16, 0), (32, 8), (64, 16), (256, 32)])
def test_chunks_respect_the_budget_cover_the_text_and_overlap(tokenizer, max_tokens, overlap):
    text = "\n\n".join(_CORPUS * 3)
    chunks = chunk_text(text, tokenizer, max_tokens, overlap)
    assert len(chunks) > 1
    for c in chunks:
        assert c.text == text[c.start:c.end] and c.text.strip()
        assert c.num_tokens == len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= max_tokens
    assert covered(text, chunks)
    assert all(a.start < b.start for a, b in zip(chunks, chunks[1:]))
    if overlap:
        assert sum(a.end > b.start for a, b in zip(chunks, chunks[1:])) >= len(chunks) // 2
    else:
        assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))


def test_chunks_prefer_paragraph_and_word_boundaries(tokenizer):
    paragraphs = [" ".join(["word"] * 20) + "." for _ in range(6)]
    text = "\n\n".join(paragraphs)
    chunks = chunk_text(text, tokenizer, 40, 4)
    for c in chunks[:-1]:
        assert text[c.end - 1].isspace() or text[c.end].isspace()  # never ends inside a word
    for c in chunks[1:]:
        assert text[c.start - 1].isspace() or text[c.start].isspace()  # overlap starts on a word


def test_multibyte_characters_are_never_split(tokenizer):
    text = "東京は日本の首都です。🚀✓ Ünïcödé — " * 60
    # byte-level BPE spreads one character over several tokens: the chunker must still cut between characters
    assert len(tokenizer("東", add_special_tokens=False)["input_ids"]) > 1
    chunks = chunk_text(text, tokenizer, 24, 4)
    for c in chunks:
        assert c.num_tokens <= 24
        assert c.text.encode("utf-8").decode("utf-8") == c.text  # whole characters only
        ids = tokenizer(c.text, add_special_tokens=False)["input_ids"]
        assert "\ufffd" not in tokenizer.decode(ids)
    assert covered(text, chunks)


def test_short_empty_and_whitespace_texts(tokenizer):
    assert chunk_text("", tokenizer) == []
    assert chunk_text(" \n\t ", tokenizer) == []
    (only,) = chunk_text("  hello world  ", tokenizer)
    assert only.text.strip() == "hello world"
    with pytest.raises(Exception, match="max_tokens >= 8"):
        chunk_text("x", tokenizer, max_tokens=4)
    with pytest.raises(Exception, match="overlap"):
        chunk_text("x", tokenizer, max_tokens=16, overlap=9)


def test_ten_megabyte_single_line_document_is_chunked(tmp_path, tokenizer):
    line = " ".join(s.replace("\n", " ") for s in _CORPUS) + " "
    text = (line * (10_000_000 // len(line.encode()) + 1))
    text = text[: len(text) - (len(text.encode()) - 10_000_000) // 2]
    path = tmp_path / "huge.txt"
    path.write_text(text, encoding="utf-8")
    assert path.stat().st_size >= 10_000_000 and "\n" not in text
    start = time.perf_counter()
    (doc,) = load_paths(path)
    chunks = chunk_text(doc.text, tokenizer, 256, 32)
    seconds = time.perf_counter() - start
    assert len(chunks) > 10_000
    assert max(c.num_tokens for c in chunks) <= 256
    assert chunks[0].start == 0 and chunks[-1].end == len(doc.text.rstrip())
    assert all(a.end > b.start for a, b in zip(chunks, chunks[1:]))  # overlapping, so no gaps
    print(f"\n10 MB single-line document: {len(chunks)} chunks in {seconds:.1f} s")


def test_jsonl_unicode_roundtrip(tmp_path):
    record = {"id": "u", "title": "Ünï", "text": "東京 🚀", "tags": ["a"]}
    (tmp_path / "u.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    (doc,) = load_paths(tmp_path / "u.jsonl")
    assert (doc.id, doc.title, doc.text, doc.metadata) == ("u", "Ünï", "東京 🚀", {"tags": ["a"]})


def _pdf(text_lines: list[str], title: str) -> bytes:
    """A minimal valid PDF (one page, Helvetica text, an /Info title), written by hand with a correct xref."""
    stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) '" for line in text_lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Title ({title}) >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 6 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_txt_titles_html_text_and_pdf_text(tmp_path):
    (tmp_path / "notes.txt").write_text("Field notes on herons\n\nThe grey heron nests in colonies.\nIt eats fish.\n")
    (tmp_path / "plain.txt").write_text("The grey heron nests in colonies.\n\nIt eats fish.\n")  # a sentence: no title
    (tmp_path / "page.html").write_text(
        "<!doctype html><html><head><title>Heron &amp; egret</title><style>p {color: red}</style>"
        "<script>var x = 'not text';</script></head><body><h1>Wading birds</h1><p>Herons stand&nbsp;still.</p>"
        "<p>Egrets are <b>white</b>.</p><script>alert(1)</script></body></html>")
    (tmp_path / "paper.pdf").write_bytes(_pdf(["Herons hunt at dawn.", "They swallow fish whole."], "Heron habits"))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a PDF body")
    warnings: list[str] = []
    docs = {Path(d.source).name: d for d in load_paths([tmp_path], warnings=warnings)}
    assert docs["notes.txt"].title == "Field notes on herons" and docs["plain.txt"].title == "plain"
    page = docs["page.html"]
    assert page.title == "Heron & egret"
    assert page.text == "Wading birds\n\nHerons stand still.\n\nEgrets are white.", repr(page.text)
    assert "not text" not in page.text and "color" not in page.text
    pdf = docs["paper.pdf"]
    assert pdf.title == "Heron habits" and "Herons hunt at dawn." in pdf.text and "swallow fish whole" in pdf.text
    assert "broken.pdf" not in docs and any("broken.pdf" in w and "readable PDF" in w for w in warnings), warnings
