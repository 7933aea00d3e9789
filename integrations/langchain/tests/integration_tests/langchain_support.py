"""Offline set-up, tiny local models and a knowledge base shared by the LangChain tests (built once per process).

NOTE: no conftest.py here on purpose: the root test suite imports names from its own `conftest` module,
and a second top-level `conftest` in the same pytest session would shadow it. Test modules import the
autouse fixture below by name instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import atexit  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from blockrag import BlockEngine  # noqa: E402
from blockrag.testing import tiny_pipeline  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# NOTE: langchain-tests' async tests are plain `async def` methods. Marking the whole class lets
# pytest-asyncio run them in any asyncio mode (this session's ini may not say "auto"); on the class's
# sync tests the mark only makes pytest-asyncio warn, and that one warning is muted.
ASYNC_SUITE_MARKS = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings(
        "ignore:The test <Function .* is marked with '@pytest.mark.asyncio':pytest.PytestWarning"),
]


@pytest.fixture(autouse=True)
def no_network():
    """Sockets off for the test (unix sockets stay: the event loop's self-pipe is a socket pair)."""
    from pytest_socket import disable_socket, enable_socket

    disable_socket(allow_unix_socket=True)
    yield
    enable_socket()


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


SAMPLE_DOCS = Path(__file__).resolve().parents[4] / "examples" / "data" / "calder_fell"


@functools.cache
def sample_knowledge_base():
    """A knowledge base over the project's sample documents, on the shared tiny engine (kept open)."""
    from blockrag.index import KnowledgeBase

    kb = KnowledgeBase.create(_scratch("blockrag-kb-") / "kb", tiny_engine(), embedder=embedder())
    kb.add_paths([SAMPLE_DOCS])
    atexit.register(kb.close)
    return kb
