"""Batched greedy answers (blockrag.train.generate) equal BlockEngine's greedy answers, mode by mode."""

import pytest
import torch

from blockrag import BlockEngine, Passage
from blockrag.errors import InvalidInputError
from blockrag.testing import tiny_model
from blockrag.train.data import RAGRecord, render
from blockrag.train.generate import decode_answers, greedy_answers

PASSAGES = [Passage("Paris is the capital of France.", title="Paris"), Passage("The quick brown fox jumps."),
            Passage("Rotary embeddings rotate keys by position."), Passage("Les élèves étudient à l'école."),
            Passage("A short one.")]
QUESTIONS = ["What is the capital of France?", "Who jumps over the lazy dog?", "What rotates keys?",
             "Where do pupils study?", "Why?"]


def _cases():
    # NOTE: different numbers and lengths of passages, so the batch is padded and rows differ in length.
    return [(PASSAGES[: 1 + i % 4] if i % 2 == 0 else PASSAGES[i % 5 :], q) for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def setup(tokenizer):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=3).eval()
    engine = BlockEngine(model, tokenizer)
    samples = [render(RAGRecord(passages=tuple(p), question=q, answer="x"), engine.template, tokenizer)
               for p, q in _cases()]
    return model, engine, samples


def _engine_ids(engine, mode, reencode=True, max_new_tokens=6):
    return [list(engine.generate(p, q, mode=mode, reencode=reencode, max_new_tokens=max_new_tokens).token_ids)
            for p, q in _cases()]


@pytest.mark.parametrize("mode,engine_mode,reencode", [("full", "full", True), ("block", "block", True),
                                                        ("block_no_pos", "block", False)])
def test_batched_greedy_answers_equal_the_engine(setup, tokenizer, mode, engine_mode, reencode):
    model, engine, samples = setup
    expected = _engine_ids(engine, engine_mode, reencode)
    got = greedy_answers(model, tokenizer, samples, mode, max_new_tokens=6, batch_size=3)
    assert got == expected
    assert decode_answers(tokenizer, got)[0] == engine.generate(*_cases()[0], mode=engine_mode, reencode=reencode,
                                                                max_new_tokens=6).text


def test_modes_differ_so_the_comparison_can_fail(setup, tokenizer):
    # Negative control: the three modes give different answers on this model, so equality above is not vacuous.
    model, engine, samples = setup
    answers = {m: greedy_answers(model, tokenizer, samples, m, max_new_tokens=6) for m in ("full", "block",
                                                                                        "block_no_pos")}
    assert answers["full"] != answers["block"]
    assert answers["block"] != answers["block_no_pos"]
    assert answers["full"] != _engine_ids(engine, "block")


def test_eos_stops_a_row_and_bad_arguments_are_refused(setup, tokenizer):
    model, _, samples = setup
    free = greedy_answers(model, tokenizer, samples[:2], "full", max_new_tokens=4, eos_ids=[])
    assert all(len(ids) == 4 for ids in free)
    stopped = greedy_answers(model, tokenizer, samples[:2], "full", max_new_tokens=4, eos_ids=[free[0][1]])
    assert stopped[0] == free[0][:1]
    with pytest.raises(InvalidInputError):
        greedy_answers(model, tokenizer, samples, "causal")
    with pytest.raises(InvalidInputError):
        greedy_answers(model, tokenizer, samples, "full", max_new_tokens=0)
