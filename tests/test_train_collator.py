"""The collator's batches: masks and positions against the independent reference, and its masked forward
against BlockEngine.prefill on the same ids."""

import pytest
import torch
from reference import reference_block_mask

from blockrag import InvalidInputError, Passage, UnsupportedModelError
from blockrag.train.collator import IGNORE_INDEX, BlockCollator, CopyRatio, check_backend, make_copy
from blockrag.train.data import RAGRecord, Sample, render

RECORDS = [
    RAGRecord(passages=(Passage("Paris is the capital of France.", title="Paris"), Passage("The fox jumps."),
                        Passage("Block attention caches each passage on its own.")),
              question="What is the capital of France?", answer="Paris is."),
    RAGRecord(passages=(Passage("42"), Passage("Les élèves étudient à l'école. 東京は日本の首都です。")),
              question="Where?", answer="At school, in Tokyo, with a longer answer than the first."),
]


def _samples(engine):
    return [render(r, engine.template, engine.tokenizer) for r in RECORDS]


def _forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False).logits.float()


@pytest.mark.parametrize("ratio, modes", [("1:1", ["block", "full"]), ("2:1", ["block", "block", "full"]),
                                          ("1:0", ["block"]), ("0:1", ["full"])])
def test_batch_masks_positions_and_labels_match_the_reference(make_engine, ratio, modes):
    engine = make_engine("llama")
    samples = _samples(engine)
    batch = BlockCollator(pad_token_id=4, ratio=CopyRatio.parse(ratio))(samples)
    assert batch["input_ids"].shape[0] == len(samples) * len(modes)
    longest = max(s.num_tokens for s in samples)
    assert batch["attention_mask"].shape == (len(samples) * len(modes), 1, longest, longest)
    for row in range(batch["input_ids"].shape[0]):
        sample, mode = samples[row // len(modes)], modes[row % len(modes)]
        n, prompt = sample.num_tokens, len(sample.prompt_ids)
        lengths = [len(b) for b in sample.blocks]
        tail = n - sum(lengths)
        expected = reference_block_mask(lengths, tail) if mode == "block" else reference_block_mask([], n)
        mask = batch["attention_mask"][row, 0]
        assert torch.equal(mask[:n, :n], expected)
        assert not mask[:n, n:].any()  # real tokens never see padding
        assert torch.equal(mask[n:, n:], torch.eye(longest - n, dtype=torch.bool))  # padding sees itself only
        assert batch["position_ids"][row, :n].tolist() == list(range(n))
        assert batch["input_ids"][row, :n].tolist() == list(sample.prompt_ids) + list(sample.response)
        assert (batch["input_ids"][row, n:] == 4).all()
        labels = batch["labels"][row]
        assert (labels[:prompt] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert labels[prompt:n].tolist() == list(sample.response)
        assert bool(batch["block_copy"][row]) == (mode == "block")


def test_block_copy_mask_differs_from_full_copy_mask():
    sample = Sample(blocks=((1, 2), (3, 4, 5)), final=(6,), response=(7, 2))
    block, full = make_copy(sample, "block"), make_copy(sample, "full")
    assert torch.equal(block.input_ids, full.input_ids) and not torch.equal(block.mask, full.mask)
    assert not block.mask[2, 1] and full.mask[2, 1]  # block 1 does not see block 0; causal does
    assert make_copy(sample, "block_no_pos").position_ids.tolist() == [0, 1, 0, 1, 2, 5, 6, 7]


def test_eager_gets_an_additive_mask_in_the_model_dtype():
    sample = Sample(blocks=((1, 2), (3,)), final=(6,), response=(7,))
    batch = BlockCollator(0, backend="eager", dtype=torch.bfloat16)([sample])
    mask = batch["attention_mask"]
    assert mask.dtype == torch.bfloat16
    allowed = mask == 0
    assert torch.equal(allowed[0, 0], reference_block_mask([2, 1], 2))
    assert (mask[~allowed] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "stablelm"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masked_forward_equals_engine_block_prefill(make_engine, arch, attn):
    engine = make_engine(arch, attn=attn)
    samples = _samples(engine)
    collator = BlockCollator.for_model(engine.model, engine.tokenizer)
    for mode, engine_kwargs in (("block", {}), ("block_no_pos", {"reencode": False}), ("full", {"mode": "full"})):
        # Both samples in one padded batch: padding must not change the shorter row.
        logits = _forward(engine.model, collator.copies(samples, mode))
        for row, record in enumerate(RECORDS):
            result = engine.prefill(list(record.passages), record.question, **engine_kwargs)
            assert list(samples[row].prompt_ids) == list(result.input_ids)
            last = len(samples[row].prompt_ids) - 1
            torch.testing.assert_close(logits[row, last], result.logits, atol=2e-5, rtol=0)
    # Negative control: the full copy does not match block mode (the blocks do see each other there).
    full = _forward(engine.model, collator.copies(samples, "full"))
    block = engine.prefill(list(RECORDS[0].passages), RECORDS[0].question)
    assert (full[0, len(samples[0].prompt_ids) - 1] - block.logits).abs().max() > 1e-3


def test_copy_ratio_parsing_and_validation():
    assert CopyRatio.parse("1:1") == CopyRatio(1, 1) and str(CopyRatio.parse(" 3:2 ")) == "3:2"
    for bad in ("1", "a:b", "1:1:1", "0:0", "-1:1"):
        with pytest.raises(InvalidInputError, match="expected"):
            CopyRatio.parse(bad)


def test_backends_that_ignore_a_custom_mask_are_refused():
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(UnsupportedModelError, match="found 'flash_attention_2'"):
        check_backend(model)
    with pytest.raises(UnsupportedModelError, match="found 'flex_attention'"):
        BlockCollator(0, backend="flex_attention")
