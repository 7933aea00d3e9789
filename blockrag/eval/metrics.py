"""Answer metrics for open-domain QA, with SQuAD normalisation.

* ``accuracy``: the paper's RAG metric (arXiv 2409.15355, released ``eval.py``: "best subspan EM"): 1 when a
  normalised gold answer is a substring of the normalised output. Long answers are not penalised, which is why
  it suits chat models that answer in sentences.
* ``exact_match``: the normalised output equals a normalised gold answer.
* ``f1``: token-level F1 between the normalised output and a gold answer (bag of tokens, SQuAD v1.1).

Every metric takes several gold answers (aliases) and keeps the best score over them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        answers = [answers]
    return [normalize_answer(a) for a in answers]


def accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if some normalised gold answer occurs in the normalised prediction (the paper's metric), else 0.0.

    Gold answers that normalise to nothing (e.g. "the") are ignored: an empty string is in every output.
    """
    output = normalize_answer(prediction)
    return float(any(gold and gold in output for gold in _golds(answers)))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    output = normalize_answer(prediction)
    return float(any(output == gold for gold in _golds(answers)))


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(prediction_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Best token F1 of the normalised prediction against the normalised gold answers (0.0 to 1.0)."""
    tokens = normalize_answer(prediction).split()
    return max((_f1(tokens, gold.split()) for gold in _golds(answers)), default=0.0)


@dataclass(frozen=True)
class Scores:
    """The three metrics of one prediction, each in [0, 1]."""

    accuracy: float
    exact_match: float
    f1: float


def score(prediction: str, answers: Sequence[str]) -> Scores:
    return Scores(accuracy(prediction, answers), exact_match(prediction, answers), f1(prediction, answers))
