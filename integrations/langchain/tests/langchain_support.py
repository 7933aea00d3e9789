"""Tiny local models and knowledge bases shared by the LangChain tests (built once per process)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from blockrag import BlockEngine
from blockrag.testing import tiny_pipeline


def _scratch(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def tiny_model_dir(arch: str = "llama", seed: int = 0) -> str:
    """A tiny random model + tokenizer saved like a Hub checkout, so `model=<path>` loads it for real."""
    model, tokenizer = tiny_pair(arch, seed)
    path = _scratch(f"blockrag-tiny-{arch}-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@functools.cache
def tiny_pair(arch: str = "llama", seed: int = 0):
    return tiny_pipeline(arch, seed=seed)


@functools.cache
def tiny_engine() -> BlockEngine:
    """One engine shared by tests that do not count cache hits."""
    return BlockEngine(*tiny_pair())


def fresh_engine() -> BlockEngine:
    """A new engine (own empty block store) over the shared tiny model."""
    return BlockEngine(*tiny_pair())


@functools.cache
def embedder():
    """The real default embedder (all-MiniLM-L6-v2 from its PyPI package), loaded once."""
    from blockrag.index import Embedder

    return Embedder()


SAMPLE_DOCS = Path(__file__).resolve().parents[3] / "examples" / "data" / "calder_fell"


@functools.cache
def sample_knowledge_base():
    """A knowledge base over the project's sample documents, on the shared tiny engine (kept open)."""
    from blockrag.index import KnowledgeBase

    kb = KnowledgeBase.create(_scratch("blockrag-kb-") / "kb", tiny_engine(), embedder=embedder())
    kb.add_paths([SAMPLE_DOCS])
    atexit.register(kb.close)
    return kb
