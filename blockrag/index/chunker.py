"""Token-aware chunking: split a document into passages of at most ``max_tokens`` tokens of the LLM's tokenizer.

Cuts fall on token boundaries that are also character boundaries (byte-level BPE may spread one multi-byte
character over several tokens; a cut never lands between them), preferring, within the last quarter of a
window, the end of a paragraph, then of a sentence, then of a word. Consecutive passages share ``overlap``
tokens. Every passage is re-tokenized on its own and checked against ``max_tokens`` (tokenization at a cut
can differ from tokenization in context).

Long texts are tokenized window by window (segments batched through the fast tokenizer), so a 10 MB
single-line document needs bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockrag.errors import InvalidInputError

_SEGMENT_CHARS = 8192


@dataclass(frozen=True)
class Chunk:
    """One passage of a document: ``text == document_text[start:end]``; ``num_tokens`` counts ``text`` alone."""

    text: str
    start: int
    end: int
    num_tokens: int


def _segments(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split text[start:end] into pieces of at most _SEGMENT_CHARS, cut just before whitespace when possible."""
    pieces, pos = [], start
    while pos < end:
        stop = min(end, pos + _SEGMENT_CHARS)
        if stop < end:
            half = pos + _SEGMENT_CHARS // 2
            cut = max(text.rfind(" ", half, stop), text.rfind("\n", half, stop))
            if cut > pos:
                stop = cut
        pieces.append((pos, stop))
        pos = stop
    return pieces


def _token_spans(text: str, start: int, end: int, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (start, end) character offsets of the tokens of text[start:end]."""
    pieces = _segments(text, start, end)
    encodings = tokenizer.backend_tokenizer.encode_batch([text[a:b] for a, b in pieces], add_special_tokens=False)
    starts, ends = [], []
    for (a, _), encoding in zip(pieces, encodings):
        offsets = encoding.offsets
        if offsets:
            arr = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + a
            starts.append(arr[:, 0])
            ends.append(arr[:, 1])
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(ends)


def _boundary_score(text: str, pos: int) -> int:
    """How good a place pos is to end a chunk: 3 paragraph, 2 sentence, 1 word, 0 inside a word."""
    if pos >= len(text):
        return 3
    after = text[pos]
    before = text[pos - 1] if pos > 0 else "\n"
    if after == "\n" and text.startswith("\n\n", pos) or before == "\n" and after == "\n":
        return 3
    if before in ".!?。！？" and (after.isspace() or after in "\"')]"):
        return 2
    if after.isspace() or before.isspace():
        return 1
    return 0


def _count(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(e) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def chunk_text(text: str, tokenizer, max_tokens: int = 256, overlap: int = 32) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens (as ``tokenizer`` counts them alone).

    Args:
        text: the document text.
        tokenizer: a fast (Rust-backed) HF tokenizer: offsets are needed to map tokens to characters.
        max_tokens: most tokens per chunk (>= 8).
        overlap: tokens shared by consecutive chunks (0 <= overlap <= max_tokens // 2).

    Returns:
        Chunks in order; whitespace-only stretches produce no chunk. Their union covers every
        non-whitespace character of ``text``.
    """
    if not isinstance(max_tokens, int) or max_tokens < 8:
        raise InvalidInputError(f"expected max_tokens >= 8, found {max_tokens!r}")
    if not isinstance(overlap, int) or not 0 <= overlap <= max_tokens // 2:
        raise InvalidInputError(f"expected 0 <= overlap <= max_tokens // 2 = {max_tokens // 2}, found {overlap!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidInputError(
            f"expected a fast tokenizer (with offsets) for token-aware chunking, found {type(tokenizer).__name__}; "
            "load it with use_fast=True"
        )
    spans = list(_spans(text, tokenizer, max_tokens, overlap))
    return _verified(text, tokenizer, spans, max_tokens)


def _spans(text: str, tokenizer, max_tokens: int, overlap: int):
    """(start, end) character spans of the chunks, before verification."""
    n = len(text)
    window = max(1 << 16, max_tokens * 64)
    pos = 0
    while pos < n:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return
        window_end = min(n, pos + window)
        starts, ends = _token_spans(text, pos, window_end, tokenizer)
        at_end = window_end == n
        if not at_end and len(starts) <= 2 * max_tokens:
            window *= 2  # very long tokens: widen until a window holds enough of them
            continue
        # boundary[j]: a cut between token j-1 and token j does not split a character.
        boundary = np.ones(len(starts) + 1, dtype=bool)
        boundary[1:-1] = starts[1:] >= ends[:-1]
        i = 0
        while True:
            remaining = len(starts) - i
            if remaining <= 0:
                pos = window_end
                break
            if at_end and remaining <= max_tokens:
                yield int(starts[i]), n
                pos = n
                break
            if not at_end and remaining <= 2 * max_tokens:
                pos = int(starts[i])  # continue in a fresh window that starts here
                break
            j = _cut(text, ends, boundary, i, i + max_tokens)
            yield int(starts[i]), int(ends[j - 1])
            i = _next_start(text, starts, boundary, max(j - overlap, i + 1), j)


def _next_start(text: str, starts: np.ndarray, boundary: np.ndarray, lo: int, hi: int) -> int:
    """First token in [lo, hi) that starts a word (else a character), so an overlap never begins mid-word."""
    first_char = -1
    for k in range(lo, hi):
        if not boundary[k]:
            continue
        pos = int(starts[k])
        if pos == 0 or text[pos].isspace() or text[pos - 1].isspace():
            return k
        if first_char < 0:
            first_char = k
    return first_char if first_char >= 0 else hi


def _cut(text: str, ends: np.ndarray, boundary: np.ndarray, i: int, j: int) -> int:
    """Best exclusive token end in (i, j]: a character boundary, preferring paragraph > sentence > word ends."""
    lowest = i + max(1, (j - i) * 3 // 4)
    best, best_score = -1, -1
    for cand in range(j, lowest - 1, -1):
        if not boundary[cand]:
            continue
        score = _boundary_score(text, int(ends[cand - 1]))
        if score > best_score:
            best, best_score = cand, score
            if score == 3:
                break
    if best < 0:
        cand = j
        while cand > i + 1 and not boundary[cand]:
            cand -= 1
        best = cand
    return best


def _verified(text: str, tokenizer, spans: list[tuple[int, int]], max_tokens: int) -> list[Chunk]:
    """Chunks whose own token count is at most max_tokens; an offender is split in two (near a space) and
    both halves are checked again, so coverage holds."""
    spans = [(a, b) for a, b in spans if text[a:b].strip()]
    counts = _count(tokenizer, [text[a:b] for a, b in spans])
    out: list[Chunk] = []
    queue = list(zip(spans, counts))
    queue.reverse()
    while queue:
        (a, b), count = queue.pop()
        if count <= max_tokens:
            out.append(Chunk(text[a:b], a, b, count))
            continue
        cut = a + max(1, (b - a) * max_tokens // (count + 1))
        space = text.rfind(" ", a + (cut - a) // 2, cut)
        cut = space if space > a else cut
        parts = [p for p in ((a, cut), (cut, b)) if text[p[0]:p[1]].strip()]
        queue.extend(reversed(list(zip(parts, _count(tokenizer, [text[x:y] for x, y in parts])))))
    return out
