"""Batched block mode over fp8 KV (``recompute_answers(kv="fp8")``) equals BlockEngine.generate over fp8-stored blocks.

The engine's side is what ``blockrag eval --kv fp8`` measures: every context block kept in the store as e4m3 with
per-(layer, head) scales (``KVBlock.quantize``), dequantised and rotated to its offset when a prompt is assembled.
"""

import pytest
import torch

from blockrag import BlockEngine, Passage
from blockrag.errors import InvalidInputError
from blockrag.store import MemoryKVStore
from blockrag.train.data import RAGRecord, render
from blockrag.train.recompute_generate import recompute_answers, recompute_prefill_batch

PASSAGES = [Passage("Paris is the capital of France.", title="Paris"), Passage("The quick brown fox jumps."),
            Passage("Rotary embeddings rotate keys by position."), Passage("Les élèves étudient à l'école."),
            Passage("A short one.")]
QUESTIONS = ["What is the capital of France?", "Who jumps over the lazy dog?", "What rotates keys?",
             "Where do pupils study?", "Why?"]
NEW_TOKENS = 6
BOUND = 1e-5  # float32 prefill logits, batched vs one prompt at a time (measured: about 1e-6)


class Fp8Store(MemoryKVStore):
    """An in-memory store that keeps every block as fp8, as an fp8 knowledge base holds them."""

    def put(self, block):
        super().put(block.quantize())


def _cases():
    # NOTE: different numbers and lengths of passages, and passages shared between prompts (encoded once per batch).
    return [(PASSAGES[: 1 + i % 4] if i % 2 == 0 else PASSAGES[i % 5 :], q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])  # GQA (2 of 4 heads) and MHA with partial rotary
def setup(request, make_model, tokenizer):
    model = make_model(request.param)
    engine = BlockEngine(model, tokenizer, store=Fp8Store())
    for passages, question in _cases():
        # NOTE: a miss is answered from the fresh full-precision block; from the second call on, the store's fp8 one.
        engine.prefill(passages, question)
    samples = [render(RAGRecord(passages=tuple(p), question=q, answer="x"), engine.template, tokenizer)
               for p, q in _cases()]
    return model, engine, samples


def test_the_engine_serves_fp8_blocks(setup):
    _, engine, samples = setup
    keys = [engine.key_of(block) for sample in samples for block in sample.blocks]
    assert all(block is not None and block.quantized for block in engine.store.get_many(keys))


def test_fp8_block_answers_equal_the_engine(setup, tokenizer):
    model, engine, samples = setup
    expected = [engine.generate(p, q, max_new_tokens=NEW_TOKENS) for p, q in _cases()]
    got = recompute_answers(model, tokenizer, samples, "none", max_new_tokens=NEW_TOKENS, batch_size=3, kv="fp8")
    assert got.answers == [list(g.token_ids) for g in expected]
    assert any(len(ids) > 1 for ids in got.answers)  # decoding over the fp8 context is exercised


def test_fp8_prefill_logits_equal_the_engine_and_native_kv_differs(setup, tokenizer):
    model, engine, samples = setup
    expected = torch.stack([engine.prefill(p, q).logits for p, q in _cases()])
    out = recompute_prefill_batch(model, samples, "none", pad_id=tokenizer.pad_token_id, kv="fp8")
    torch.testing.assert_close(out.logits, expected, atol=BOUND, rtol=0)
    # Negative control: the same batch over full-precision block KV misses the fp8 logits by far more than BOUND.
    native = recompute_prefill_batch(model, samples, "none", pad_id=tokenizer.pad_token_id)
    assert ((native.logits - expected).abs().amax(dim=-1) > 100 * BOUND).all()  # measured: 9e-3 and more


@pytest.mark.parametrize("spec", ["first:2", "deviation:0.2", "first:1+query:0.2"])
def test_fp8_recompute_answers_equal_the_engine(setup, tokenizer, spec):
    model, engine, samples = setup
    expected = [engine.generate(p, q, max_new_tokens=NEW_TOKENS, recompute=spec) for p, q in _cases()]
    got = recompute_answers(model, tokenizer, samples, spec, max_new_tokens=NEW_TOKENS, batch_size=2, kv="fp8")
    assert got.answers == [list(g.token_ids) for g in expected]
    assert [len(s) for s in got.selected] == [g.usage.recomputed_tokens for g in expected]


def test_an_unknown_kv_format_is_refused(setup, tokenizer):
    model, _, samples = setup
    with pytest.raises(InvalidInputError, match="expected kv in"):
        recompute_answers(model, tokenizer, samples, "none", kv="int8")
