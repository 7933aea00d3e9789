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
    model, tokenizer = tiny_pipeline(arch, seed=seed)
    path = _scratch(f"blockrag-tiny-{arch}-")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@functools.cache
def tiny_engine() -> BlockEngine:
    return BlockEngine(*tiny_pipeline("llama"))
