"""Shared fixtures: one locally trained tokenizer and tiny random models, built once per session."""

from __future__ import annotations

import functools
import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from blockrag.testing import build_tokenizer, tiny_model  # noqa: E402

SUPPORTED_ARCHS = ["llama", "llama3", "yarn", "qwen2", "qwen3", "mistral", "gemma", "stablelm", "phi", "gpt_neox"]
REFUSED_ARCHS = {
    "gpt2": "rotary position embeddings",
    "sliding": "sliding window",
    "dynamic": "'dynamic'",
    "longrope": "'longrope'",
    "hybrid": "full_attention",
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def make_model(tokenizer):
    """make_model(arch, dtype=float32, attn='sdpa') -> a cached tiny model."""

    @functools.cache
    def make(arch: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
        return tiny_model(arch, vocab_size=len(tokenizer), dtype=dtype, attn_implementation=attn)

    return make


@pytest.fixture(scope="session")
def make_engine(tokenizer, make_model):
    """make_engine(arch, template='chat', **kwargs) -> a fresh BlockEngine (own store) over a cached model."""
    from blockrag import BlockEngine

    def make(arch: str = "llama", template="chat", dtype=torch.float32, attn="sdpa", **kwargs):
        return BlockEngine(make_model(arch, dtype, attn), tokenizer, template=template, **kwargs)

    return make


class _DeprecationLog(logging.Handler):
    """Collects deprecation notices transformers logs (it logs some instead of warning, e.g. the
    ``out.past_key_values`` attribute), so that a test triggering one fails like a FutureWarning would."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecated" in message.lower():
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_transformers_deprecations():
    handler = _DeprecationLog()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    assert not handler.messages, f"transformers logged a deprecation: {handler.messages}"


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer) of the embedded real model (smollm2-135m, fp32 on the CPU), loaded once per session."""
    from blockrag.models import load

    loaded = load("smollm2-135m", device="cpu", dtype=torch.float32)
    return loaded.model, loaded.tokenizer
