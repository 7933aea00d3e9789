"""Block-mode prefill == ONE forward with the block mask and contiguous positions (the reference)."""

import pytest
import torch
from conftest import SUPPORTED_ARCHS
from reference import reference_greedy, reference_logits

PASSAGES = [
    "Paris is the capital of France.",
    "Rotary embeddings rotate keys by position; a rotation by p plus delta is a rotation by delta after p.",
    "The fox jumps.",
    "Les élèves étudient à l'école. 東京は日本の首都です。",
    "Block attention caches each passage on its own.",
    "42",
    "You are a helpful assistant; answer the question using the reference passages below, and say so if not.",
    "Title-less passage with numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "emoji 🚀 and a check mark ✓",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog again.",
]
QUESTION = "What is the capital of France?"


def _context(result):
    return [list(block.token_ids) for block in result.blocks]


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("count", [1, 2, 10])
def test_block_prefill_equals_block_masked_reference(arch, count, make_engine):
    engine = make_engine(arch)
    result = engine.prefill(PASSAGES[:count], QUESTION)
    blocks = _context(result)
    assert len(blocks) == count + 1  # block 0 + one per passage
    assert len({len(b) for b in blocks}) > 1 or count == 1  # uneven lengths
    assert result.input_ids == tuple(t for b in blocks for t in b) + result.final_ids
    assert result.position_ids == tuple(range(len(result.input_ids)))
    expected = reference_logits(engine.model, blocks, result.final_ids)[-1]
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)

    # Negative control: the same blocks without position re-encoding do not match the reference.
    unrotated = engine.prefill(PASSAGES[:count], QUESTION, reencode=False)
    assert (unrotated.logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "stablelm"])
def test_eager_attention_matches_reference_too(arch, make_engine):
    engine = make_engine(arch, attn="eager")
    result = engine.prefill(PASSAGES[:3], QUESTION)
    expected = reference_logits(engine.model, _context(result), result.final_ids)[-1]
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_single_block_and_question_equals_full_mode(arch, make_engine):
    """With no passages there is one context block: block mode must equal an ordinary causal prefill."""
    engine = make_engine(arch)
    block = engine.prefill([], QUESTION)
    full = engine.prefill([], QUESTION, mode="full")
    assert block.input_ids == full.input_ids
    torch.testing.assert_close(block.logits, full.logits, atol=1e-4, rtol=0)
    assert full.usage.prefilled_tokens == len(full.input_ids) and full.usage.cached_tokens == 0


def test_full_mode_is_one_causal_prefill_over_the_same_ids(make_engine):
    engine = make_engine("qwen2")
    block = engine.prefill(PASSAGES[:4], QUESTION)
    full = engine.prefill(PASSAGES[:4], QUESTION, mode="full")
    assert full.input_ids == block.input_ids
    with torch.no_grad():
        causal = engine.model(input_ids=torch.tensor([full.input_ids])).logits[0, -1]
    torch.testing.assert_close(full.logits, causal, atol=1e-4, rtol=0)
    # Several blocks: block mode sees less than full attention, so (untrained) logits differ.
    assert (block.logits - full.logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_greedy_generation_equals_reference_decoding(arch, make_engine):
    engine = make_engine(arch)
    generation = engine.generate(PASSAGES[:3], QUESTION, max_new_tokens=16)
    blocks = _context(generation.prefill)
    expected = reference_greedy(engine.model, blocks, generation.prefill.final_ids, 16, engine.eos_ids)
    assert list(generation.token_ids) == expected
    assert generation.usage.generated_tokens == len(expected)


def test_blocks_are_reused_across_requests(make_engine):
    engine = make_engine("llama")
    first = engine.prefill(PASSAGES[:3], QUESTION)
    second = engine.prefill(PASSAGES[:3], "Another question?")
    assert first.usage.cached_tokens == 0 and first.usage.encoded_tokens == sum(len(b.token_ids) for b in first.blocks)
    assert second.usage.encoded_tokens == 0
    assert second.usage.cached_tokens == first.usage.encoded_tokens
    assert all(b.cached for b in second.blocks)
    # Order matters for positions, not for keys: the same blocks reordered are still cache hits.
    reordered = engine.prefill(PASSAGES[:3][::-1], QUESTION)
    assert reordered.usage.encoded_tokens == 0
    expected = reference_logits(engine.model, _context(reordered), reordered.final_ids)[-1]
    torch.testing.assert_close(reordered.logits, expected, atol=1e-4, rtol=0)


def test_precomputed_kvblocks_can_be_passed_directly(make_engine):
    engine = make_engine("qwen3")
    kv = engine.encode(PASSAGES[:2])
    from_blocks = engine.prefill(kv, QUESTION)
    from_text = engine.prefill(PASSAGES[:2], QUESTION)
    torch.testing.assert_close(from_blocks.logits, from_text.logits, atol=1e-6, rtol=0)
    assert from_blocks.input_ids == from_text.input_ids
