"""A prompt of arbitrary segments (cached blocks, then live text) == the block-masked reference.

The reference is one forward over all ids with the block mask (tests/reference.py): every cached segment sees
only itself, the live tail sees everything before it. Negative control: the same ids as one causal prompt
(full mode) give different logits, so the comparison can fail.
"""

import pytest
import torch
from reference import reference_greedy, reference_logits

from blockrag import InvalidInputError, PromptTooLongError
from blockrag.prompt import Segment

TURNS = [
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n",
    "<|im_start|>user\nWhere is Paris?<|im_end|>\n<|im_start|>assistant\nIn France.<|im_end|>\n",
    "<|im_start|>user\nAnd Rome?<|im_end|>\n<|im_start|>assistant\nItaly.<|im_end|>\n",
]
LIVE = ["<|im_start|>user\nWhich is further north?<|im_end|>\n", "<|im_start|>assistant\n"]


def segments(turns=TURNS, live=LIVE):
    return [Segment(t) for t in turns] + [Segment(t, cached=False) for t in live]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi"])
def test_segments_match_the_block_masked_reference(arch, make_engine, tokenizer):
    engine = make_engine(arch)
    result = engine.prefill_segments(segments())
    blocks = [list(b.token_ids) for b in result.blocks]
    assert len(blocks) == len(TURNS)
    assert blocks[1] == tokenizer(TURNS[1], add_special_tokens=False)["input_ids"]  # each segment on its own
    live = [t for text in LIVE for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert list(result.final_ids) == live
    expected = reference_logits(engine.model, blocks, live)[-1]
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=0)
    full = engine.prefill_segments(segments(), mode="full")
    assert full.input_ids == result.input_ids
    assert (full.logits - expected).abs().max() > 1e-3  # negative control: causal attention across segments


def test_generation_over_segments_equals_reference_decoding(make_engine):
    engine = make_engine("qwen2")
    generation = engine.generate_segments(segments(), max_new_tokens=6)
    blocks = [list(b.token_ids) for b in generation.prefill.blocks]
    expected = reference_greedy(engine.model, blocks, generation.prefill.final_ids, 6, engine.eos_ids)
    assert list(generation.token_ids) == expected
    streamed = engine.stream_segments(segments(), max_new_tokens=6)
    assert "".join(streamed) == generation.text and streamed.result.token_ids == generation.token_ids


def test_a_changed_segment_re_encodes_only_itself(make_engine):
    engine = make_engine("llama")
    first = engine.prefill_segments(segments())
    assert first.usage.encoded_tokens == sum(len(b.token_ids) for b in first.blocks)
    again = engine.prefill_segments(segments())
    assert again.usage.encoded_tokens == 0 and again.usage.cached_tokens == first.usage.encoded_tokens
    changed = [*TURNS[:2], TURNS[2].replace("Italy", "In Italy")]
    third = engine.prefill_segments(segments(changed))
    assert [b.cached for b in third.blocks] == [True, True, False]
    assert third.usage.encoded_tokens == len(third.blocks[2].token_ids)


def test_kvblocks_can_stand_for_cached_segments(make_engine):
    engine = make_engine("llama")
    reference = engine.prefill_segments(segments())
    blocks = engine.source_blocks([list(b.token_ids) for b in reference.blocks], TURNS)[0]
    mixed = engine.prefill_segments([blocks[0], Segment(TURNS[1]), blocks[2], *segments([], LIVE)])
    torch.testing.assert_close(mixed.logits, reference.logits, atol=1e-5, rtol=0)


def test_segment_errors_are_typed(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidInputError, match="after the cached ones"):
        engine.prefill_segments([Segment("a", cached=False), Segment("b"), Segment("c", cached=False)])
    with pytest.raises(InvalidInputError, match="at least one live segment"):
        engine.prefill_segments([Segment("a"), Segment("b")])
    with pytest.raises(InvalidInputError, match="non-empty segment"):
        engine.prefill_segments([Segment("  "), Segment("q", cached=False)])
    with pytest.raises(InvalidInputError, match="non-empty sequence"):
        engine.prefill_segments([])
    with pytest.raises(InvalidInputError, match="found str"):
        engine.generate_segments(["plain text", Segment("q", cached=False)])
    with pytest.raises(PromptTooLongError):
        engine.prefill_segments([Segment("word " * 1100), Segment("q", cached=False)])
