"""Batched encoding == one-by-one encoding; padding never reaches a block's KV."""

import pytest
import torch
from reference import keys_at

from blockrag.encoder import BlockEncoder, plan_batches

TEXTS = ["short", "a somewhat longer passage about rotary embeddings", "mid length text here",
         "x", "Les élèves étudient à l'école. 東京は日本の首都です。 🚀"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gemma"])
def test_batched_equals_one_by_one(arch, make_model, tokenizer):
    model = make_model(arch)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    keys = [f"k{i}" for i in range(len(ids))]
    batched = BlockEncoder(model, "fp", token_budget=10_000).encode(ids, keys)
    single = BlockEncoder(model, "fp", token_budget=1).encode(ids, keys)  # budget 1: one block per pass
    for a, b, block_ids in zip(batched, single, ids):
        assert a.token_ids == tuple(block_ids) and a.keys.shape[2] == len(block_ids)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
        # Independent reference: a plain forward of this block alone.
        torch.testing.assert_close(a.keys, keys_at(model, block_ids, 0), atol=1e-5, rtol=0)


def test_padding_does_not_leak(make_model, tokenizer):
    """A short block's KV is the same next to a long block as alone (negative control: a different block differs)."""
    model = make_model("llama")
    enc = BlockEncoder(model, "fp")
    short = tokenizer("tiny", add_special_tokens=False)["input_ids"]
    long = tokenizer(" ".join(TEXTS), add_special_tokens=False)["input_ids"]
    alone = enc.encode([short], ["s"])[0]
    padded = enc.encode([long, short], ["l", "s"])[1]
    torch.testing.assert_close(padded.keys, alone.keys, atol=1e-5, rtol=0)
    other = enc.encode([tokenizer("tinx", add_special_tokens=False)["input_ids"]], ["o"])[0]
    assert other.keys.shape != alone.keys.shape or (other.keys - alone.keys).abs().max() > 1e-3


def test_plan_batches_respects_budget_and_covers_everything():
    lengths = [5, 100, 7, 60, 60, 1, 300]
    batches = plan_batches(lengths, token_budget=128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 128


def test_engine_encode_hands_over_a_batch_at_a_time_in_order(make_model, tokenizer):
    """BlockEngine.encode tokenizes (a few texts a call) and hands passages to the encoder a batch at a time; the
    blocks come back in the passages' order, equal to each passage encoded alone (duplicates across batches come
    from the store)."""
    from blockrag import BlockEngine
    from blockrag.engine import TOKENIZE_CHUNK

    model = make_model("llama")
    texts = TEXTS + TEXTS[:2] + [f"passage number {i} of the set" for i in range(TOKENIZE_CHUNK)]
    assert len(texts) > TOKENIZE_CHUNK  # tokenized over several calls
    engine = BlockEngine(model, tokenizer, token_budget=24)
    calls = []
    fetch = engine.blocks.fetch
    engine.blocks.fetch = lambda ids, texts=None, **kw: calls.append(len(ids)) or fetch(ids, texts, **kw)
    blocks = engine.encode(texts)
    assert len(calls) > 2 and sum(calls) == len(texts)  # several hand-overs, every passage once
    alone = BlockEngine(model, tokenizer, token_budget=1)
    for text, block in zip(texts, blocks):
        want = alone.encode([text])[0]
        assert block.key == want.key and block.token_ids == tuple(engine.block_ids(text))
        torch.testing.assert_close(block.keys, want.keys, atol=1e-5, rtol=0)
    assert blocks[len(TEXTS)] is blocks[0]  # a duplicate in a later batch: the stored block
    assert blocks[0].key != blocks[1].key  # negative control: different passages, different blocks
