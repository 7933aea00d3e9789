"""Batched selective-recompute answers (blockrag.train.recompute_generate) equal BlockEngine.generate(recompute=...)."""

import pytest
import torch
from reference import reference_block_mask, to_model_mask

from blockrag import BlockEngine, Passage
from blockrag.errors import InvalidInputError
from blockrag.train.data import RAGRecord, render
from blockrag.train.generate import greedy_answers
from blockrag.train.recompute_generate import recompute_answers, recompute_inputs, recompute_prefill_batch

PASSAGES = [Passage("Paris is the capital of France.", title="Paris"), Passage("The quick brown fox jumps."),
            Passage("Rotary embeddings rotate keys by position."), Passage("Les élèves étudient à l'école."),
            Passage("A short one.")]
QUESTIONS = ["What is the capital of France?", "Who jumps over the lazy dog?", "What rotates keys?",
             "Where do pupils study?", "Why?"]
SELECTIONS = ["none", "all", "first:2", "deviation:0.2", "query:0.3@1", "first:1+deviation:0.1+query:0.1"]
NEW_TOKENS = 6


def _cases():
    # NOTE: different numbers and lengths of passages, so rows of a batch differ in context and selection length.
    return [(PASSAGES[: 1 + i % 4] if i % 2 == 0 else PASSAGES[i % 5 :], q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])  # GQA (2 of 4 heads) and MHA with partial rotary
def setup(request, make_model, tokenizer):
    model = make_model(request.param)
    engine = BlockEngine(model, tokenizer)
    samples = [render(RAGRecord(passages=tuple(p), question=q, answer="x"), engine.template, tokenizer)
               for p, q in _cases()]
    return model, engine, samples


def _engine(engine, **kwargs):
    return [engine.generate(p, q, max_new_tokens=NEW_TOKENS, **kwargs) for p, q in _cases()]


@pytest.mark.parametrize("spec", SELECTIONS)
def test_batched_recompute_answers_equal_the_engine(setup, tokenizer, spec):
    model, engine, samples = setup
    expected = _engine(engine, recompute=spec)
    got = recompute_answers(model, tokenizer, samples, spec, max_new_tokens=NEW_TOKENS, batch_size=3)
    assert got.answers == [list(g.token_ids) for g in expected]
    assert [len(s) for s in got.selected] == [g.usage.recomputed_tokens for g in expected]
    assert any(len(ids) > 1 for ids in got.answers)  # decoding over the recompute cache is exercised


def test_none_is_block_mode_and_all_is_full_mode(setup, tokenizer):
    model, _, samples = setup
    none = recompute_answers(model, tokenizer, samples, "none", max_new_tokens=NEW_TOKENS, batch_size=2)
    everything = recompute_answers(model, tokenizer, samples, "all", max_new_tokens=NEW_TOKENS, batch_size=4)
    assert none.answers == greedy_answers(model, tokenizer, samples, "block", max_new_tokens=NEW_TOKENS)
    assert everything.answers == greedy_answers(model, tokenizer, samples, "full", max_new_tokens=NEW_TOKENS)
    assert none.answers != everything.answers  # block and full mode differ on this model: the checks can fail
    starts = [len(s.blocks[0]) for s in samples]
    assert all(sel == list(range(start, sum(map(len, s.blocks))))
               for sel, start, s in zip(everything.selected, starts, samples))


@pytest.mark.parametrize("spec", ["first:2", "deviation:0.2", "first:1+query:0.2"])
def test_prefill_logits_equal_the_engine_and_a_wrong_selection_differs(setup, tokenizer, spec):
    model, engine, samples = setup
    expected = torch.stack([engine.prefill(p, q, recompute=spec).logits for p, q in _cases()])
    out = recompute_prefill_batch(model, samples, spec, pad_id=tokenizer.pad_token_id)
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)
    # Negative controls: the same selection moved one token later, plain block mode and full mode all differ.
    moved = [sorted({min(p + 1, sum(map(len, s.blocks)) - 1) for p in sel}) for sel, s in zip(out.selected, samples)]
    wrong = recompute_prefill_batch(model, samples, selections=moved, pad_id=tokenizer.pad_token_id)
    for other in (wrong.logits, torch.stack([engine.prefill(p, q).logits for p, q in _cases()]),
                  torch.stack([engine.prefill(p, q, mode="full").logits for p, q in _cases()])):
        assert ((other - expected).abs().amax(dim=-1) > 1e-3).all()


@torch.no_grad()
def _prefixed_reference_logits(model, sample):
    """Last-token logits of one forward over the whole prompt with the loop-built prefixed mask (every passage sees
    block 0 and itself), positions 0..N-1: what context="prefixed" with nothing recomputed must give."""
    ids = [t for block in sample.blocks for t in block] + list(sample.final)
    mask = reference_block_mask([len(b) for b in sample.blocks], len(sample.final), shared_prefix=True)
    out = model(input_ids=torch.tensor([ids]), attention_mask=to_model_mask(mask, model),
                position_ids=torch.arange(len(ids))[None], use_cache=False)
    return out.logits[0, -1].float()


def test_prefixed_context_equals_a_one_pass_reference_and_differs_from_block_mode(setup, tokenizer):
    model, engine, samples = setup
    expected = torch.stack([_prefixed_reference_logits(model, s) for s in samples])
    got = recompute_prefill_batch(model, samples, "none", pad_id=tokenizer.pad_token_id, context="prefixed")
    torch.testing.assert_close(got.logits, expected, atol=1e-4, rtol=0)
    block = recompute_prefill_batch(model, samples, "none", pad_id=tokenizer.pad_token_id)
    assert ((block.logits - expected).abs().amax(dim=-1) > 1e-3).all()  # negative control: block mode differs
    # recomputing everything over a prefixed context is still full mode
    everything = recompute_answers(model, tokenizer, samples, "all", max_new_tokens=NEW_TOKENS, context="prefixed")
    assert everything.answers == greedy_answers(model, tokenizer, samples, "full", max_new_tokens=NEW_TOKENS)
    with pytest.raises(InvalidInputError, match="context"):
        recompute_answers(model, tokenizer, samples, "none", context="shared")
    with pytest.raises(InvalidInputError, match="encoded alone"):
        recompute_answers(model, tokenizer, samples, "none", kv="fp8", context="prefixed")


def _reference_mask(sample, selected):
    """The visibility of the second forward written out key by key: rows = selected copies then the final block;
    columns = the context's block copies then the rows' own keys. True = attend."""
    n = sum(map(len, sample.blocks))
    rows = list(selected) + list(range(n, n + len(sample.final)))
    mask = torch.zeros(len(rows), n + len(rows), dtype=torch.bool)
    for r, q in enumerate(rows):
        for j in range(n):
            mask[r, j] = j <= q and j not in selected
        for c, k in enumerate(rows):
            mask[r, n + c] = k <= q
    return mask


def test_recompute_inputs_match_a_key_by_key_reference(setup):
    _, _, samples = setup
    selections = [[], [9, 10, 30], list(range(5, 20))]
    chosen = samples[:3]
    width = max(sum(map(len, s.blocks)) for s in chosen)
    inputs = recompute_inputs(chosen, selections, width, pad_id=0)
    fed = inputs["input_ids"].shape[1]
    for row, (sample, selected) in enumerate(zip(chosen, selections)):
        n, real = sum(map(len, sample.blocks)), len(selected) + len(sample.final)
        columns = list(range(width - n, width)) + list(range(width + fed - real, width + fed))
        got = inputs["attention_mask"][row, 0, fed - real :][:, columns]
        assert torch.equal(got, _reference_mask(sample, selected))
        assert inputs["visible"][row].sum() == n + len(sample.final)  # superseded block copies stay hidden
        assert inputs["next_position"][row] == n + len(sample.final)


def test_bad_arguments_are_refused(setup, tokenizer):
    model, _, samples = setup
    with pytest.raises(InvalidInputError, match="exactly one"):
        recompute_answers(model, tokenizer, samples)
    with pytest.raises(InvalidInputError, match="exactly one"):
        recompute_answers(model, tokenizer, samples, "first:2", selections=[[]] * len(samples))
    with pytest.raises(InvalidInputError, match="sorted distinct"):
        recompute_answers(model, tokenizer, samples[:1], selections=[[5, 3]])
    with pytest.raises(InvalidInputError, match="one selection per sample"):
        recompute_answers(model, tokenizer, samples, selections=[[]])
    with pytest.raises(InvalidInputError, match="expected a recompute selection"):
        recompute_answers(model, tokenizer, samples, "most:3")
