"""Namespace-package layout and the public surface."""

from __future__ import annotations

from pathlib import Path

import llama_index
import llama_index.core
import llama_index.llms.blockrag as llms
import llama_index.retrievers.blockrag as retrievers

ROOT = Path(__file__).resolve().parents[1]


def test_namespace_packages_have_no_init():
    for folder in ("llama_index", "llama_index/llms", "llama_index/retrievers"):
        assert not (ROOT / folder / "__init__.py").exists(), folder
    assert getattr(llama_index, "__file__", None) is None  # a namespace shared with llama-index-core
    assert Path(llama_index.core.__file__).parent != ROOT / "llama_index" / "core"


def test_public_surface():
    assert llms.__all__ == ["BlockKVTransform", "BlockRAGLLM", "BlockSynthesizer"]
    assert retrievers.__all__ == ["BlockRAGRetriever", "hit_node"]
    assert all(hasattr(llms, n) for n in llms.__all__) and all(hasattr(retrievers, n) for n in retrievers.__all__)
