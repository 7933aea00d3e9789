"""What a knowledge base returns: retrieved passages and answers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from blockrag.engine import Generation, Usage


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
