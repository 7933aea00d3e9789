"""Selective recompute (training-free block-mode recovery) == an independent slow reference.

The reference is ONE forward pass over a sequence written out by hand: every context token as its block-mode copy
(attending within its own block), then a second copy of every selected token (attending to everything before it:
the recomputed copy of selected positions, the block copy of the others), then the final block (same rule), each
at its own position, with an explicit mask.
"""

import pytest
import torch
from conftest import SUPPORTED_ARCHS
from reference import cache_of, reference_block_mask, to_model_mask, with_cache

from blockrag.assemble import assemble_cache
from blockrag.errors import InvalidInputError
from blockrag.recompute import Recompute, recompute_prefill, select_positions

PASSAGES = [
    "Paris is the capital of France.",
    "Rotary embeddings rotate keys by position; a rotation by p plus delta is a rotation by delta after p.",
    "The fox jumps over the lazy dog, twice.",
]
QUESTION = "What is the capital of France?"


def _owners(block_lengths):
    owner = []
    for index, length in enumerate(block_lengths):
        owner += [index] * length
    return owner


@torch.no_grad()
def reference_recompute(model, block_ids, final_ids, selected, wrong=False, keep=None):
    """Last-token logits of the hand-written sequence (see the module docstring); keep=K: the last K tokens'.

    wrong=True: selected copies also see the context AFTER their position (a causality bug; negative control).
    """
    context = [t for b in block_ids for t in b]
    n, s, f = len(context), len(selected), len(final_ids)
    owner = _owners([len(b) for b in block_ids])
    ids = context + [context[p] for p in selected] + list(final_ids)
    positions = list(range(n)) + list(selected) + list(range(n, n + f))
    copy_of = {p: n + i for i, p in enumerate(selected)}
    size = n + s + f
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            mask[i, j] = owner[i] == owner[j]
    for row in range(n, size):
        p = positions[row]
        last = n - 1 if wrong and row < n + s else min(p, n - 1)
        for j in range(last + 1):
            mask[row, copy_of.get(j, j)] = True
        for t in range(f):
            if n + t <= p:
                mask[row, n + s + t] = True
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), attention_mask=to_model_mask(mask, model).to(device),
                position_ids=torch.tensor([positions], device=device), use_cache=False)
    return (out.logits[0, -1] if keep is None else out.logits[0, -keep:]).float().cpu()


def _setup(engine, passages=PASSAGES):
    result = engine.prefill(passages, QUESTION)
    blocks = engine.stored_blocks([b.key for b in result.blocks])
    cache, n = assemble_cache(blocks, engine.rope, engine.model.config, engine.device, dtype=engine.dtype)
    block_ids = [list(b.token_ids) for b in result.blocks]
    context = [t for b in block_ids for t in b]
    assert n == len(context)
    return result, cache, block_ids, context, list(result.final_ids)


def _recompute(engine, spec):
    result, cache, block_ids, context, final = _setup(engine)
    positions = select_positions(engine.model, spec, [len(b) for b in block_ids], context, cache, final)
    logits, out_cache = recompute_prefill(engine.model, cache, context, positions, final)
    return result, block_ids, final, positions, logits, out_cache


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_recompute_all_equals_full_mode(arch, make_engine):
    engine = make_engine(arch)
    result, block_ids, final, positions, logits, _ = _recompute(engine, "all")
    assert positions == list(range(len(block_ids[0]), sum(len(b) for b in block_ids)))
    full = engine.prefill(PASSAGES, QUESTION, mode="full")
    torch.testing.assert_close(logits, full.logits, atol=1e-4, rtol=0)
    # Negative control: block mode (nothing recomputed) is far from full mode on this untrained model.
    assert (result.logits - full.logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_recompute_none_equals_block_mode(arch, make_engine):
    engine = make_engine(arch)
    result, _, _, positions, logits, _ = _recompute(engine, "none")
    assert positions == []
    torch.testing.assert_close(logits, result.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi", "gpt_neox"])  # rotary variants: full, qk-norm, partial
def test_a_selection_equals_the_reference_for_it(arch, make_engine):
    engine = make_engine(arch)
    result, cache, block_ids, context, final = _setup(engine)
    lengths = [len(b) for b in block_ids]
    generator = torch.Generator().manual_seed(0)
    candidates = torch.arange(lengths[0], len(context))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[: len(candidates) // 3]]
    selected = sorted(int(p) for p in chosen)
    logits, _ = recompute_prefill(engine.model, cache, context, selected, final)
    expected = reference_recompute(engine.model, block_ids, final, selected)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    # Negative controls: the wrong visibility rule, plain block mode and full mode all differ from it.
    wrong = reference_recompute(engine.model, block_ids, final, selected, wrong=True)
    assert (logits - wrong).abs().max() > 1e-4
    assert (logits - result.logits).abs().max() > 1e-3
    full = engine.prefill(PASSAGES, QUESTION, mode="full")
    assert (logits - full.logits).abs().max() > 1e-3


def test_kept_logits_of_the_last_final_tokens_equal_the_reference(make_engine):
    """keep=K scores K tokens fed at the end of the final block (an answer, teacher-forced) in one pass."""
    engine = make_engine("llama")
    _, cache, block_ids, context, final = _setup(engine)
    answer = engine.tokenizer.encode(" Paris, on the Seine.", add_special_tokens=False)
    fed = final + answer
    selected = list(range(len(block_ids[0]), len(context), 3))
    kept, _ = recompute_prefill(engine.model, cache, context, selected, fed, keep=len(answer) + 1)
    expected = reference_recompute(engine.model, block_ids, fed, selected, keep=len(answer) + 1)
    assert kept.shape == (len(answer) + 1, expected.shape[-1])
    torch.testing.assert_close(kept, expected, atol=1e-4, rtol=0)
    last, _ = recompute_prefill(engine.model, cache, context, selected, fed)
    torch.testing.assert_close(kept[-1], last, atol=1e-5, rtol=0)  # the default keeps the last token's only
    # Negative controls: rows one token off, and block mode's logits (nothing recomputed), differ from them.
    assert (kept[1:] - expected[:-1]).abs().max() > 1e-3
    block, _ = recompute_prefill(engine.model, cache, context, [], fed, keep=len(answer) + 1)
    assert (kept - block).abs().max() > 1e-3
    with pytest.raises(InvalidInputError, match="keep"):
        recompute_prefill(engine.model, cache, context, selected, fed, keep=len(fed) + 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "stablelm"])
def test_eager_attention_recompute_equals_reference(arch, make_engine):
    engine = make_engine(arch, attn="eager")
    _, cache, block_ids, context, final = _setup(engine)
    selected = select_positions(engine.model, "first:3", [len(b) for b in block_ids], context, cache, final)
    logits, _ = recompute_prefill(engine.model, cache, context, selected, final)
    torch.testing.assert_close(logits, reference_recompute(engine.model, block_ids, final, selected), atol=1e-4,
                               rtol=0)


def test_first_k_selects_the_first_tokens_of_every_passage_block(make_engine):
    engine = make_engine("llama")
    _, cache, block_ids, context, final = _setup(engine)
    lengths = [len(b) for b in block_ids]
    selected = select_positions(engine.model, "first:4", lengths, context, cache, final)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert selected == sorted(s + j for s, length in zip(starts[1:], lengths[1:]) for j in range(min(4, length)))
    union = select_positions(engine.model, "first:2+first:4", lengths, context, cache, final)
    assert union == selected


@torch.no_grad()
def _independent_deviation(model, block_ids, layer):
    """Per-token deviation at ``layer``: plain full forward vs the block-masked forward, no hooks."""
    context = [t for b in block_ids for t in b]
    ids = torch.tensor([context])
    full = cache_of(model(input_ids=ids, use_cache=True)).layers[layer]
    mask = to_model_mask(reference_block_mask([len(b) for b in block_ids], 0), model)
    block = cache_of(model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(len(context))[None],
                           use_cache=True)).layers[layer]
    scores = []
    for name in ("keys", "values"):
        a, b = getattr(full, name)[0].float(), getattr(block, name)[0].float()  # (H, N, D)
        per_token = (a - b).permute(1, 0, 2).reshape(len(context), -1).norm(dim=-1)
        scale = a.permute(1, 0, 2).reshape(len(context), -1).norm(dim=-1).mean()
        scores.append(per_token / scale)
    return scores[0] + scores[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_deviation_selects_the_most_deviating_passage_tokens(arch, make_engine):
    engine = make_engine(arch)
    _, cache, block_ids, context, final = _setup(engine)
    lengths = [len(b) for b in block_ids]
    selected = select_positions(engine.model, "deviation:0.25@1", lengths, context, cache, final)
    scores = _independent_deviation(engine.model, block_ids, 1)
    start = lengths[0]
    count = -(-(len(context) - start) * 25 // 100)
    expected = sorted(start + int(i) for i in torch.topk(scores[start:], count).indices)
    assert selected == expected
    assert scores[:start].abs().max() < 1e-4  # block 0 is exact in block mode: nothing to recover there
    # Negative control: layer 0 keys and values depend only on the token and its position: no deviation there.
    assert _independent_deviation(engine.model, block_ids, 0).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_query_selects_the_tokens_the_question_attends_to(arch, make_engine):
    engine = make_engine(arch)
    _, cache, block_ids, context, final = _setup(engine)
    lengths = [len(b) for b in block_ids]
    selected = select_positions(engine.model, "query:20%@1", lengths, context, cache, final)
    eager = make_engine(arch, attn="eager").model
    mask = to_model_mask(reference_block_mask(lengths, len(final)), eager)
    with torch.no_grad():
        out = eager(input_ids=torch.tensor([context + final]), attention_mask=mask,
                    position_ids=torch.arange(len(context) + len(final))[None], output_attentions=True)
    weights = out.attentions[1][0, :, len(context):, : len(context)].sum(dim=(0, 1))
    start = lengths[0]
    count = -(-(len(context) - start) * 20 // 100)
    assert selected == sorted(start + int(i) for i in torch.topk(weights[start:], count).indices)
    assert engine.model.config._attn_implementation == "sdpa"  # restored after the probe


def test_decoding_continues_from_the_recompute_cache(make_engine):
    """Greedy tokens after recompute-all equal those of full-mode generation."""
    engine = make_engine("llama")
    _, _, final, _, logits, cache = _recompute(engine, "all")
    full = engine.generate(PASSAGES, QUESTION, mode="full", max_new_tokens=6)
    position = cache.layers[0].keys.shape[-2]
    tokens = []
    with torch.no_grad():
        for _ in range(len(full.token_ids)):
            token = int(logits.argmax())
            tokens.append(token)
            out = engine.model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]),
                               use_cache=True, **with_cache(engine.model, cache))
            logits, cache, position = out.logits[0, -1].float(), cache_of(out), position + 1
    assert tuple(tokens) == full.token_ids


@pytest.mark.parametrize("spec, text", [
    ("first:8", "first:8"), ("deviation:10%", "deviation:0.1"), ("deviation:0.15@2", "deviation:0.15@2"),
    ("first:4+query:0.2", "first:4+query:0.2"), ("all", "all"), ("none", "none")])
def test_parse_round_trips(spec, text):
    assert str(Recompute.parse(spec)) == text


@pytest.mark.parametrize("spec", ["", "first", "first:0", "first:2.5", "deviation:0", "deviation:1.5", "magic:3",
                                  "all:3", "query:0.1@x", 7])
def test_bad_specs_are_refused(spec):
    with pytest.raises(InvalidInputError, match="expected"):
        Recompute.parse(spec)


# --- the engine option ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
def test_engine_option_all_none_and_a_selection(arch, make_engine):
    engine = make_engine(arch)
    full = engine.prefill(PASSAGES, QUESTION, mode="full")
    block = engine.prefill(PASSAGES, QUESTION)
    everything = engine.prefill(PASSAGES, QUESTION, recompute="all")
    torch.testing.assert_close(everything.logits, full.logits, atol=1e-4, rtol=0)
    passage_tokens = sum(len(b.token_ids) for b in block.blocks[1:])
    assert everything.usage.recomputed_tokens == passage_tokens
    assert everything.usage.prefilled_tokens == passage_tokens + len(block.final_ids)
    nothing = engine.prefill(PASSAGES, QUESTION, recompute="none")
    torch.testing.assert_close(nothing.logits, block.logits, atol=1e-4, rtol=0)
    assert nothing.usage.recomputed_tokens == 0
    first = engine.prefill(PASSAGES, QUESTION, recompute="first:3")
    block_ids = [list(b.token_ids) for b in block.blocks]
    selected = [sum(len(b) for b in block_ids[:i]) + j for i in range(1, len(block_ids)) for j in range(3)]
    torch.testing.assert_close(first.logits, reference_recompute(engine.model, block_ids, list(block.final_ids),
                                                                 selected), atol=1e-4, rtol=0)
    assert first.usage.recomputed_tokens == len(selected)


def test_engine_generation_with_recompute_all_equals_full_mode(make_engine):
    engine = make_engine("qwen3")
    full = engine.generate(PASSAGES, QUESTION, mode="full", max_new_tokens=8)
    recovered = engine.generate(PASSAGES, QUESTION, recompute="all", max_new_tokens=8)
    assert recovered.token_ids == full.token_ids
    assert recovered.usage.recomputed_tokens > 0
    stream = engine.stream(PASSAGES, QUESTION, recompute="all", max_new_tokens=8)
    assert "".join(stream) == full.text and stream.result.usage.recomputed_tokens == recovered.usage.recomputed_tokens


def test_engine_refuses_recompute_outside_block_mode(make_engine):
    engine = make_engine("llama")
    with pytest.raises(InvalidInputError, match="block mode"):
        engine.prefill(PASSAGES, QUESTION, mode="full", recompute="first:4")
    with pytest.raises(InvalidInputError, match="re-encoding"):
        engine.generate(PASSAGES, QUESTION, reencode=False, recompute="first:4")
    with pytest.raises(InvalidInputError, match="expected a recompute selection"):
        engine.stream(PASSAGES, QUESTION, recompute="most:4")
