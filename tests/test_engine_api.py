"""Engine construction by path, the process-wide shared engine, and stored-block lookups."""

import pytest
import torch

from blockrag import BlockEngine, InvalidInputError, KVBlock, Passage


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, make_model, tokenizer):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    make_model("qwen2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_from_pretrained_loads_a_local_path_and_matches_the_loaded_pair(saved_model, make_engine):
    loaded = BlockEngine.from_pretrained(saved_model, device="cpu")
    in_memory = make_engine("qwen2")
    assert loaded.fingerprint == in_memory.fingerprint  # same config, vocab, dtype and weights
    a = loaded.prefill(["A passage about Paris."], "Where?")
    b = in_memory.prefill(["A passage about Paris."], "Where?")
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)


def test_shared_engine_is_loaded_once_per_process(saved_model):
    first = BlockEngine.shared(saved_model, device="cpu")
    assert BlockEngine.shared(saved_model, device="cpu") is first
    assert BlockEngine.shared(saved_model, device="cpu", template="tulu3-block") is not first


def test_passage_or_block_and_stored_blocks(make_engine):
    engine = make_engine("llama")
    block = engine.encode([Passage("Stored text.", title="T")])[0]
    assert engine.passage_or_block("Stored text.", "T", block.key) is block
    fallback = engine.passage_or_block("Other text.", None, "0" * 64)
    assert isinstance(fallback, Passage) and fallback.text == "Other text."
    assert [b.key for b in engine.stored_blocks([block.key])] == [block.key]
    with pytest.raises(InvalidInputError, match="found none for this model"):
        engine.stored_blocks(["f" * 64])
    other = make_engine("qwen3")
    foreign = other.encode([Passage("Stored text.", title="T")])[0]
    engine.store.put(KVBlock(keys=foreign.keys, values=foreign.values, token_ids=foreign.token_ids,
                             fingerprint=foreign.fingerprint, key="k" * 64))
    with pytest.raises(InvalidInputError):
        engine.stored_blocks(["k" * 64])  # a block of another model is never served
    assert isinstance(engine.passage_or_block("x", None, "k" * 64), Passage)
