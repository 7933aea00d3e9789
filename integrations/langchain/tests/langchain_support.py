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
