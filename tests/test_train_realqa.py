"""Training records from real-QA examples: training splits only, gold or the model's own answers as targets."""

import pytest
import torch

from blockrag.errors import InvalidInputError
from blockrag.template import Passage, get_template
from blockrag.testing import tiny_model
from blockrag.train.realqa import check_training_split, self_answers, to_record, training_records


def _example(i, source="disflqa", split="train", answers=("the gold span",)):
    return {"id": f"{source}-{i}", "question": f"Question {i}?", "answers": list(answers), "source": source,
            "split": split, "article": f"a{i}", "gold_index": 0,
            "passages": [{"title": "T", "text": f"Passage {i} holds the gold span."}, {"text": "Another passage."}]}


def test_gold_targets_for_short_answer_sources_and_own_answers_elsewhere():
    examples = [_example(0), _example(1, "boolq", answers=("yes",)), _example(2, "narrativeqa",
                                                                              answers=("A long free-form answer.",))]
    records, counts = training_records(examples, own=["own 0", "own 1", "own 2"])
    assert [r.answer for r in records] == ["the gold span", "yes", "own 2"]
    assert counts == {"gold": 2, "self": 1, "dropped": 0}
    assert records[0].passages == (Passage("Passage 0 holds the gold span.", "T"), Passage("Another passage."))
    # label-free: every source takes the model's own answer; an empty one drops the example
    records, counts = training_records(examples, own=["own 0", "", "own 2"],
                                       targets={"disflqa": "self", "boolq": "self", "narrativeqa": "self"})
    assert [r.answer for r in records] == ["own 0", "own 2"]
    assert counts == {"gold": 0, "self": 2, "dropped": 1}


def test_evaluation_examples_are_refused():
    with pytest.raises(InvalidInputError, match="training-split"):
        training_records([_example(0), _example(1, split="eval")])
    with pytest.raises(InvalidInputError, match="training-split"):
        check_training_split([{"id": "x"}])
    check_training_split([_example(0)])  # a training example passes


def test_own_answers_are_required_where_the_target_is_self():
    with pytest.raises(InvalidInputError, match="own answers"):
        training_records([_example(0, "narrativeqa")])
    with pytest.raises(InvalidInputError, match="one own answer per example"):
        training_records([_example(0)], own=["a", "b"])


def test_self_answers_are_the_models_full_mode_greedy_answers(tokenizer):
    from blockrag import BlockEngine

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=5).eval()
    template = get_template("chat", tokenizer)
    examples = [_example(0), _example(1, "narrativeqa")]
    got = self_answers(model, tokenizer, template, examples, max_new_tokens=5)
    engine = BlockEngine(model, tokenizer, template=template)
    record = to_record(examples[1])
    expected = engine.generate(list(record.passages), record.question, mode="full", max_new_tokens=5).text.strip()
    assert got[1] == expected
