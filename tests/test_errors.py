"""Bad input: typed errors whose messages say what was expected and what was found."""

import dataclasses

import pytest
import torch

import blockrag
from blockrag import (
    BlockRAGError,
    InvalidInputError,
    KVBlockMismatchError,
    PromptTooLongError,
)


@pytest.mark.parametrize("question", ["", "   \n", None])
def test_empty_question(make_engine, question):
    engine = make_engine("llama")
    with pytest.raises(InvalidInputError, match="non-empty question"):
        engine.prefill(["p"], question)
    with pytest.raises(InvalidInputError):
        engine.stream(["p"], question)  # raised at the call, not at the first next()


def test_prompt_longer_than_max_positions_is_refused_before_any_compute(make_engine):
    engine = make_engine("llama")
    calls = []
    handle = engine.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        long_passage = "word " * 700  # two of these exceed the 1024 positions of the tiny models
        with pytest.raises(PromptTooLongError, match=r"tokens, the model accepts at most 1024"):
            engine.prefill([long_passage, long_passage + "again"], "Q?")
        with pytest.raises(PromptTooLongError):
            engine.generate([long_passage, long_passage + "again"], "Q?", mode="full")
        with pytest.raises(PromptTooLongError):
            engine.prefill([], "why " * 1100)
    finally:
        handle.remove()
    assert calls == []
    assert isinstance(PromptTooLongError("x"), BlockRAGError)


def test_block_from_another_model_is_refused(make_engine):
    llama, qwen = make_engine("llama"), make_engine("qwen2")
    block = qwen.encode(["a passage"])[0]
    with pytest.raises(KVBlockMismatchError, match="model fingerprint"):
        llama.prefill([block], "Q?")


def test_block_with_wrong_dtype_or_device_is_refused(make_engine):
    engine = make_engine("llama")
    block = engine.encode(["a passage"])[0]
    half = dataclasses.replace(block, keys=block.keys.half(), values=block.values.half())
    with pytest.raises(KVBlockMismatchError, match="dtype"):
        engine.prefill([half], "Q?")
    meta = dataclasses.replace(block, keys=block.keys.to("meta"), values=block.values.to("meta"))
    with pytest.raises(KVBlockMismatchError, match="device"):
        engine.prefill([meta], "Q?")


def test_fingerprint_changes_with_weights_config_and_dtype(make_model, tokenizer):
    from blockrag.kv import model_fingerprint
    from blockrag.testing import tiny_model

    base = make_model("llama")
    fp = model_fingerprint(base, tokenizer, torch.float32)
    assert fp == model_fingerprint(base, tokenizer, torch.float32)
    assert fp != model_fingerprint(base, tokenizer, torch.bfloat16)
    assert fp != model_fingerprint(tiny_model("llama", vocab_size=len(tokenizer), seed=1), tokenizer, torch.float32)
    assert fp != model_fingerprint(make_model("llama3"), tokenizer, torch.float32)


def test_empty_passages_are_skipped_with_a_warning(make_engine):
    engine = make_engine("llama")
    result = engine.prefill(["real passage", "  ", ""], "Q?")
    assert len(result.blocks) == 2  # block 0 + the real passage
    assert result.warnings == ("skipped empty passage at index 1", "skipped empty passage at index 2")
    reference = engine.prefill(["real passage"], "Q?")
    torch.testing.assert_close(result.logits, reference.logits, atol=0, rtol=0)
    with pytest.raises(InvalidInputError, match="non-empty passages"):
        engine.encode(["ok", " "])


def test_wrong_argument_types(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidInputError, match="sequence of passages"):
        engine.prefill("just a string", "Q?")
    with pytest.raises(InvalidInputError, match="found int"):
        engine.prefill([3], "Q?")
    with pytest.raises(InvalidInputError, match="mode"):
        engine.prefill(["p"], "Q?", mode="fast")
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        engine.generate(["p"], "Q?", max_new_tokens=0)


def test_public_surface_is_pinned():
    assert sorted(blockrag.__all__) == sorted([
        "BlockEngine", "BlockInfo", "BlockRAGError", "BlockTemplate", "Generation", "GenerationStream",
        "InvalidInputError", "KVBlock", "KVBlockMismatchError", "Passage", "PrefillResult", "PromptTooLongError",
        "UnsupportedModelError", "Usage", "block_key", "model_fingerprint",
    ])
    for name in blockrag.__all__:
        assert hasattr(blockrag, name)


def test_import_does_not_pull_training_or_gpu_extras():
    import subprocess
    import sys

    code = ("import sys, blockrag; bad = [m for m in ('peft', 'triton', 'matplotlib', 'blockrag.train', "
            "'langchain_core', 'llama_index') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
