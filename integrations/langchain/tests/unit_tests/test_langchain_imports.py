"""The public surface is explicit, and the dependency points one way (integrations -> blockrag)."""

from __future__ import annotations

import re
from pathlib import Path

import langchain_blockrag

import blockrag


def test_public_surface():
    assert langchain_blockrag.__all__ == [
        "BlockRAGRetriever",
        "ChatBlockRAG",
        "create_rag_chain",
        "document_block",
        "rag_messages",
    ]
    assert all(hasattr(langchain_blockrag, name) for name in langchain_blockrag.__all__)


def test_core_never_imports_the_frameworks():
    pattern = re.compile(r"^\s*(from|import)\s+(langchain\w*|llama_index)\b", re.M)
    offenders = [str(p) for p in Path(blockrag.__file__).parent.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
