"""The synthetic RAG task: deterministic, fresh facts per example, 2-hop questions that need two passages."""

import dataclasses

import pytest
import torch

from blockrag import BlockEngine
from blockrag.train.collator import CopyRatio
from blockrag.train.data import render
from blockrag.train.synthetic import (
    ATTRIBUTES,
    RELATION,
    Curriculum,
    SyntheticDataset,
    SyntheticTask,
    TaskConfig,
    build_tokenizer,
    evaluate,
    new_model,
    template,
)

TASK = SyntheticTask(TaskConfig(entities=64, passages=8, questions=8, seed=3))
TRIPLES = SyntheticTask(TaskConfig(entities=64, passages=8, questions=8, seed=3, style="triples"))


@pytest.fixture(scope="module")
def word_tokenizer():
    return build_tokenizer(TASK.config)


def _lookup_facts(passages):
    """entity -> (its fact, passage index), from passages like 'e5 rome . e17 e42 .'."""
    facts = {}
    for i, text in enumerate(passages):
        for fact in text.split(" . "):
            subject, value = fact.strip(" .").split()
            assert subject not in facts, "one fact per entity"
            facts[subject] = (value, i)
    return facts


def _triple_facts(passages):
    facts = {}
    for i, text in enumerate(passages):
        for fact in text.split(" . "):
            subject, key, value = fact.strip(" .").split()
            facts[(subject, key)] = (value, i)
    return facts


@pytest.mark.parametrize("task", [TASK, TRIPLES], ids=["lookup", "triples"])
def test_examples_are_deterministic_and_draw_fresh_facts(task):
    a, b = task.example("train", 5), task.example("train", 5)
    assert a == b
    assert task.example("train", 6) != a and task.example("heldout", 5) != a
    other = SyntheticTask(dataclasses.replace(task.config, seed=4))
    assert other.example("train", 5) != a
    # The same entity gets other facts in other examples: nothing to memorise.
    parse = _lookup_facts if task is TASK else (lambda ps: {k[0]: v for k, v in _triple_facts(ps).items()
                                                           if k[1] == "city"})
    seen = {parse(task.example("train", i).passages).get("e1", (None,))[0] for i in range(400)}
    assert len(seen - {None}) > 8


@pytest.mark.parametrize("task", [TASK, TRIPLES], ids=["lookup", "triples"])
def test_heldout_contexts_never_appear_in_training(task):
    train = {task.example("train", i).passages for i in range(3000)}
    assert not any(task.example("heldout", i).passages in train for i in range(300))


def test_lookup_answers_are_in_the_passages_and_two_hop_needs_two_passages():
    hops = {1: 0, 2: 0}
    for i in range(200):
        example = TASK.example("heldout", i)
        facts = _lookup_facts(example.passages)
        assert len(example.passages) == 8 and len(facts) == 24 and len(example.questions) == 8
        for q in example.questions:
            hops[q.hops] += 1
            marker, entity = q.text.split()
            if q.hops == 1:
                assert marker == "one" and facts[entity][0] == q.answer
            else:
                bridge, first = facts[entity]
                value, second = facts[bridge]
                assert marker == "two" and q.answer == f"{bridge} {value}" and first != second
                assert value in {v for values in ATTRIBUTES.values() for v in values}
    assert hops[1] > 500 and hops[2] > 500


def test_triples_two_hop_needs_two_passages():
    for i in range(100):
        example = TRIPLES.example("heldout", i)
        facts = _triple_facts(example.passages)
        for q in example.questions:
            words = q.text.split()
            if q.hops == 1:
                assert facts[(words[0], words[1])][0] == q.answer
            else:
                assert words[1] == RELATION and words[2] in ATTRIBUTES
                bridge, first = facts[(words[0], RELATION)]
                value, second = facts[(bridge, words[2])]
                assert q.answer == f"{bridge} {value}" and first != second


def test_word_level_tokenizer_covers_the_task(word_tokenizer):
    example = TASK.example("train", 0)
    sample = render(example.record(), template(), word_tokenizer)
    unk = word_tokenizer.unk_token_id
    assert all(unk not in block for block in sample.blocks) and unk not in sample.response
    assert sample.blocks[0][0] == word_tokenizer.bos_token_id
    assert all(len(b) == len(t.split()) for b, t in zip(sample.blocks[1:], example.passages))
    assert word_tokenizer.decode(sample.response, skip_special_tokens=True) == example.record().answer


def test_eval_spans_cover_each_answer_and_its_separator(word_tokenizer):
    example = TASK.example("heldout", 1)
    item = TASK.eval_item(example, word_tokenizer, template())
    for (a, b, hops), q in zip(item.spans, example.questions):
        assert word_tokenizer.decode(item.sample.response[a:b]) == f"{q.answer} ;" and hops == q.hops


def test_curriculum_grows_the_number_of_passages(word_tokenizer):
    data = SyntheticDataset(TASK, word_tokenizer, template(), 1000, curriculum=Curriculum())
    counts = [len(data[i].blocks) - 1 for i in (0, 10, 100, 200, 999)]
    assert counts[0] == 1 and counts[-1] >= 4 and counts == sorted(counts)


def test_evaluate_scores_gold_and_wrong_predictions(word_tokenizer):
    """A model that always predicts the gold next token scores 100; a random one scores ~0 (negative control)."""
    items = TASK.eval_items(4, word_tokenizer, template())

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"_attn_implementation": "sdpa"})()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kwargs):
            logits = torch.zeros(*input_ids.shape, len(word_tokenizer))
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 1.0)
            return type("Out", (), {"logits": logits})()

    scores = evaluate(Oracle(), items, "block", pad_token_id=word_tokenizer.pad_token_id)
    assert scores["accuracy"] == 100.0 and scores["n"] == 32
    random_model = new_model(word_tokenizer, hidden=32, layers=1, heads=2)
    assert evaluate(random_model, items, "block", pad_token_id=word_tokenizer.pad_token_id)["accuracy"] < 10


def test_engine_serves_the_synthetic_template(word_tokenizer):
    model = new_model(word_tokenizer, hidden=32, layers=1, heads=2).eval()
    engine = BlockEngine(model, word_tokenizer, template=template())
    example = TASK.example("heldout", 0)
    result = engine.prefill(list(example.passages), example.questions[0].text)
    sample = render(example.record(), template(), word_tokenizer)
    assert list(result.input_ids) == list(sample.prompt_ids)
    assert str(CopyRatio()) == "1:1"
