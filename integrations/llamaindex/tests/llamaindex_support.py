"""Offline set-up, tiny local models, engines and a knowledge base shared by the LlamaIndex tests.

NOTE: no conftest.py here on purpose: the root test suite imports names from its own `conftest` module,
and a second top-level `conftest` in the same pytest session would shadow it. Test modules import the
autouse fixture below by name instead, and mark their async tests explicitly.
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
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events import BaseEvent  # noqa: E402

from blockrag import BlockEngine  # noqa: E402
from blockrag.testing import tiny_pipeline  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def no_network():
    """Sockets off for the test (unix sockets stay: the event loop's self-pipe is a socket pair)."""
    from pytest_socket import disable_socket, enable_socket

    disable_socket(allow_unix_socket=True)
    yield
    enable_socket()


@functools.cache
def tiny_pair(arch: str = "llama", seed: int = 0):
    return tiny_pipeline(arch, seed=seed)


def tiny_engine(arch: str = "llama", seed: int = 0) -> BlockEngine:
    """A fresh engine (own empty store) over a shared tiny random model."""
    return BlockEngine(*tiny_pair(arch, seed))


@functools.cache
def tiny_model_dir(arch: str = "llama", seed: int = 0) -> str:
    """The tiny model saved like a Hub checkout, so `model_name=<path>` loads it for real."""
    model, tokenizer = tiny_pair(arch, seed)
    path = Path(tempfile.mkdtemp(prefix=f"blockrag-tiny-{arch}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class EventLog(BaseEventHandler):
    """Records LlamaIndex instrumentation events (a real handler on the root dispatcher)."""

    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "EventLog"

    def handle(self, event: BaseEvent, **kwargs) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def record_events() -> EventLog:
    log = EventLog(events=[])
    get_dispatcher().add_event_handler(log)
    return log


def stop_recording(log: EventLog) -> None:
    handlers = get_dispatcher().event_handlers
    if log in handlers:
        handlers.remove(log)


@functools.cache
def embedder():
    """The real default embedder (all-MiniLM-L6-v2 from its PyPI package), loaded once."""
    from blockrag.index import Embedder

    return Embedder()


SAMPLE_DOCS = Path(__file__).resolve().parents[3] / "examples" / "data" / "calder_fell"


@functools.cache
def sample_knowledge_base():
    """A knowledge base over the project's sample documents on its own tiny engine (kept open)."""
    from blockrag.index import KnowledgeBase

    folder = Path(tempfile.mkdtemp(prefix="blockrag-kb-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    kb = KnowledgeBase.create(folder / "kb", tiny_engine(), embedder=embedder())
    kb.add_paths([SAMPLE_DOCS])
    atexit.register(kb.close)
    return kb
