"""Evaluation: RAG accuracy and time to first token of block mode vs full mode (and closed-book).

Import explicitly (``import blockrag.eval``); ``import blockrag`` never imports it. The CLI is ``blockrag eval``.

    from blockrag.eval import EvalSettings, load_dataset, run_eval, write_report
    data = load_dataset("nq_test.json", "auto")
    outcome = run_eval(engine, data, "out/", EvalSettings(modes=("block", "full"), k=10))
    write_report("out/", outcome.records, ("block", "full"), outcome.info)
"""

from blockrag.eval.datasets import (
    FORMATS,
    Dataset,
    DatasetError,
    EvalExample,
    Problem,
    detect_format,
    load_dataset,
    synthetic_examples,
)
from blockrag.eval.metrics import Scores, accuracy, exact_match, f1, normalize_answer, score
from blockrag.eval.report import markdown_table, summarize, write_report
from blockrag.eval.runner import (
    MODES,
    EvalSettings,
    ResultsLog,
    ResumeMismatchError,
    RunOutcome,
    evaluate_example,
    run_eval,
)

__all__ = [
    "FORMATS",
    "MODES",
    "Dataset",
    "DatasetError",
    "EvalExample",
    "EvalSettings",
    "Problem",
    "ResultsLog",
    "ResumeMismatchError",
    "RunOutcome",
    "Scores",
    "accuracy",
    "detect_format",
    "evaluate_example",
    "exact_match",
    "f1",
    "load_dataset",
    "markdown_table",
    "normalize_answer",
    "run_eval",
    "score",
    "summarize",
    "synthetic_examples",
    "write_report",
]
