"""Evaluation data: question, gold answers and passages, from the formats of the paper's four RAG sets.

Formats (``load_dataset(path, format)``; a file is a JSON array or JSON Lines, optionally gzipped):

* ``hotpot`` -- 2WikiMultiHopQA and HotpotQA: ``{"_id", "question", "answer", "context": [[title,
  [sentence, ...]], ...]}``. ``context`` may also be the Hugging Face layout ``{"title": [...], "sentences":
  [[...], ...]}`` or either of them as a JSON string (the 2Wiki parquet release). Sentences are joined as
  written (HotpotQA sentences carry their leading space); paragraphs keep the file's order.
* ``dpr`` -- Natural Questions and TriviaQA in the DPR / FiD retrieval format: ``{"question", "answers":
  [...], "ctxs": [{"id", "title", "text", "score"}, ...]}``; ``answer`` or ``target`` are accepted for
  ``answers``. Passages are sorted by ``score``, best first, when every passage has one.
* ``jsonl`` -- generic: ``{"id"?, "question", "answers": [...] | "answer": str, "passages"?: [str |
  {"title"?, "text", "score"?}, ...]}``.
* ``auto`` -- decided by the first record's keys: ``ctxs`` -> dpr, ``context`` -> hotpot, else jsonl.

A malformed record (bad JSON, a missing or mistyped field) is reported with its line number and skipped, or
refused with ``strict=True``. The synthetic RAG task of ``blockrag.train.synthetic`` is available through
``synthetic_examples``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockrag.errors import BlockRAGError
from blockrag.template import Passage

FORMATS = ("auto", "hotpot", "dpr", "jsonl")
FORMAT_ALIASES = {"2wiki": "hotpot", "2wikimultihopqa": "hotpot", "hotpotqa": "hotpot", "nq": "dpr",
                  "triviaqa": "dpr", "fid": "dpr", "generic": "jsonl"}
_ID_KEYS = ("id", "_id", "qid", "question_id")


class DatasetError(BlockRAGError, ValueError):
    """An evaluation data file that cannot be read, or a malformed record under ``strict``."""


@dataclass(frozen=True)
class EvalExample:
    """One question to evaluate.

    Attributes:
        id: unique within the dataset (the record's id, else ``line<N>``).
        question: the question text.
        answers: gold answers (aliases); any one counts.
        passages: context passages, best first (empty when retrieved from a knowledge base or closed-book).
        line: 1-based line of the file where the record starts (None for generated examples).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...] = ()
    line: int | None = None


@dataclass(frozen=True)
class Problem:
    """A malformed record: where it starts and what is wrong with it."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class Dataset:
    """Examples read from one source, the records skipped, and a digest that identifies the source's content."""

    source: str
    format: str
    examples: list[EvalExample]
    problems: list[Problem] = field(default_factory=list)
    digest: str = ""


class _Malformed(Exception):
    """Internal: a record that does not fit its format; the message says expected vs found."""


# --- reading records ------------------------------------------------------------------------------

def _open_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"expected a readable data file at {path}, found {type(e).__name__}: {e}") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as e:
            raise DatasetError(f"expected gzip data in {path}, found {e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"expected UTF-8 text in {path}, found undecodable bytes at offset {e.start}") from None


def _records(text: str, path: Path) -> Iterator[tuple[int, Any | _Malformed]]:
    """(line, parsed record or _Malformed) for a JSON array or JSON Lines text."""
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":
        yield from _array_records(text, start + 1, path)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            yield number, _Malformed(f"expected one JSON object per line, found invalid JSON ({e.msg} at column "
                                     f"{e.colno})")


def _array_records(text: str, position: int, path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on (syntax errors are fatal)."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    def skip_space(offset: int) -> int:
        while offset < len(text) and text[offset] in " \t\r\n":
            offset += 1
        return offset

    position = skip_space(position)
    if text[position : position + 1] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise DatasetError(f"expected a JSON array of records in {path}, found invalid JSON at line {e.lineno} "
                               f"column {e.colno}: {e.msg}") from None
        yield line_at(position), value
        position = skip_space(end)
        separator = text[position : position + 1]
        if separator == "]":
            return
        if separator != ",":
            found = repr(separator) if separator else "the end of the file"
            raise DatasetError(f"expected ',' or ']' in the JSON array of {path} at line {line_at(position)}, "
                               f"found {found}")
        position = skip_space(position + 1)


# --- fields ---------------------------------------------------------------------------------------

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _question(record: dict) -> str:
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        found = "no 'question'" if "question" not in record else f"{_type_name(question)} {question!r:.40}"
        raise _Malformed(f"expected 'question' as a non-empty string, found {found}")
    return question.strip()


def _answers(record: dict, keys: tuple[str, ...]) -> tuple[str, ...]:
    key = next((k for k in keys if k in record), None)
    if key is None:
        raise _Malformed(f"expected gold answers under {' or '.join(repr(k) for k in keys)}, found keys "
                         f"{sorted(record)}")
    value = record[key]
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(a, str) for a in values):
        raise _Malformed(f"expected '{key}' as a string or a non-empty list of strings, found "
                         f"{_type_name(value)} {value!r:.60}")
    answers = tuple(dict.fromkeys(a.strip() for a in values if a.strip()))
    if not answers:
        raise _Malformed(f"expected at least one non-empty answer in '{key}', found {value!r:.60}")
    return answers


def _score(value: Any, where: str) -> float | None:
    if value is None:
        return None
    try:
        score = float(value)  # NOTE: DPR's retriever output writes scores as strings ("82.53")
    except (TypeError, ValueError):
        raise _Malformed(f"expected a numeric score for {where}, found {_type_name(value)} {value!r:.40}") from None
    if math.isnan(score):
        raise _Malformed(f"expected a numeric score for {where}, found NaN")
    return score


def _passage(item: Any, where: str) -> tuple[Passage, float | None]:
    if isinstance(item, str):
        return Passage(item.strip()), None
    if not isinstance(item, dict):
        raise _Malformed(f"expected {where} as a string or an object with 'text', found {_type_name(item)}")
    text, title = item.get("text"), item.get("title")
    if not isinstance(text, str):
        raise _Malformed(f"expected {where}['text'] as a string, found {_type_name(text)}")
    if title is not None and not isinstance(title, str):
        raise _Malformed(f"expected {where}['title'] as a string, found {_type_name(title)}")
    return Passage(text.strip(), title.strip() if title else None), _score(item.get("score"), where)


def _ranked(items: list[tuple[Passage, float | None]]) -> tuple[Passage, ...]:
    """Non-empty passages, best score first when every passage has a score, else in the given order."""
    items = [(p, s) for p, s in items if p.text]
    if items and all(s is not None for _, s in items):
        items = sorted(items, key=lambda ps: -ps[1])  # stable: ties keep the file's order
    return tuple(p for p, _ in items)


def _passage_list(record: dict, key: str, required: bool) -> tuple[Passage, ...]:
    value = record.get(key)
    if value is None:
        if required:
            raise _Malformed(f"expected '{key}' with at least one passage (or retrieve them with --kb, or use "
                             "only the closed-book mode), found none")
        return ()
    if not isinstance(value, list):
        raise _Malformed(f"expected '{key}' as a list, found {_type_name(value)}")
    passages = _ranked([_passage(item, f"{key}[{i}]") for i, item in enumerate(value)])
    if required and not passages:
        raise _Malformed(f"expected '{key}' with at least one non-empty passage, found {len(value)} empty ones")
    return passages


def _join_sentences(sentences: list[str]) -> str:
    text = ""
    for sentence in sentences:
        if text and not text[-1].isspace() and not sentence[:1].isspace():
            text += " "
        text += sentence
    return text.strip()


def _hotpot_context(record: dict, required: bool) -> tuple[Passage, ...]:
    context = record.get("context")
    if isinstance(context, str):
        try:
            context = json.loads(context)
        except json.JSONDecodeError as e:
            raise _Malformed(f"expected 'context' as a list or a JSON string of one, found invalid JSON ({e.msg})"
                             ) from None
    if context is None:
        return _passage_list(record, "context", required)
    if isinstance(context, dict):  # Hugging Face layout: {"title": [...], "sentences": [[...], ...]}
        titles, sentences = context.get("title"), context.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise _Malformed("expected 'context' as {'title': [...], 'sentences': [[...], ...]} of equal lengths, "
                             f"found keys {sorted(context)}")
        context = [[t, s] for t, s in zip(titles, sentences)]
    if not isinstance(context, list):
        raise _Malformed(f"expected 'context' as a list of [title, sentences], found {_type_name(context)}")
    passages = []
    for i, paragraph in enumerate(context):
        if not (isinstance(paragraph, (list, tuple)) and len(paragraph) == 2 and isinstance(paragraph[0], str)):
            raise _Malformed(f"expected context[{i}] as [title, [sentence, ...]], found {paragraph!r:.60}")
        title, sentences = paragraph
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise _Malformed(f"expected context[{i}][1] as a list of sentences, found {_type_name(sentences)}")
        passages.append((Passage(_join_sentences(sentences), title.strip() or None), None))
    ranked = _ranked(passages)
    if required and not ranked:
        raise _Malformed("expected 'context' with at least one non-empty paragraph, found none")
    return ranked


def _parse(record: Any, fmt: str, require_passages: bool) -> tuple[str | None, str, tuple[str, ...],
                                                                   tuple[Passage, ...]]:
    if not isinstance(record, dict):
        raise _Malformed(f"expected a JSON object per record, found {_type_name(record)}")
    question = _question(record)
    if fmt == "hotpot":
        answers = _answers(record, ("answer", "answers"))
        aliases = record.get("answer_aliases")
        if isinstance(aliases, list):
            answers = tuple(dict.fromkeys(answers + tuple(a.strip() for a in aliases if isinstance(a, str)
                                                          and a.strip())))
        passages = _hotpot_context(record, require_passages)
    elif fmt == "dpr":
        answers = _answers(record, ("answers", "answer", "target"))
        passages = _passage_list(record, "ctxs", require_passages)
    else:
        answers = _answers(record, ("answers", "answer"))
        passages = _passage_list(record, "passages", require_passages)
    record_id = next((record[k] for k in _ID_KEYS if isinstance(record.get(k), (str, int))), None)
    return (None if record_id is None else str(record_id)), question, answers, passages


def detect_format(record: Any) -> str | None:
    """The format a record belongs to, from its keys; None if it is not a recognisable record."""
    if not isinstance(record, dict) or "question" not in record:
        return None
    if "ctxs" in record:
        return "dpr"
    if "context" in record:
        return "hotpot"
    if any(k in record for k in ("answers", "answer", "passages")):
        return "jsonl"
    return None


def resolve_format(name: str) -> str:
    fmt = FORMAT_ALIASES.get(name.lower(), name.lower())
    if fmt not in FORMATS:
        raise DatasetError(f"expected a format in {FORMATS} (or an alias in {sorted(FORMAT_ALIASES)}), "
                           f"found {name!r}")
    return fmt


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_dataset(path: str | Path, format: str = "auto", *, strict: bool = False, require_passages: bool = True,
                 limit: int | None = None) -> Dataset:
    """Read evaluation examples from a file.

    Args:
        path: a .json (array), .jsonl file, optionally .gz.
        format: "auto", "hotpot", "dpr", "jsonl" (or an alias: 2wiki, hotpotqa, nq, triviaqa).
        strict: raise DatasetError on the first malformed record instead of skipping it.
        require_passages: a record without passages is malformed (False when passages come from a knowledge
            base or only the closed-book mode runs).
        limit: stop after this many examples.

    Raises:
        DatasetError: unreadable file, an undecidable format, a malformed record under ``strict``, or no
            usable example at all.
    """
    path = Path(path)
    fmt = resolve_format(format)
    if limit is not None and limit < 1:
        raise DatasetError(f"expected a limit >= 1, found {limit}")
    text = _open_text(path)
    examples: list[EvalExample] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for line, record in _records(text, path):
        try:
            if isinstance(record, _Malformed):
                raise record
            if fmt == "auto":
                detected = detect_format(record)
                if detected is None:
                    keys = sorted(record) if isinstance(record, dict) else _type_name(record)
                    raise DatasetError(
                        f"expected records with 'question' and 'ctxs' (NQ/TriviaQA, DPR/FiD), 'context' "
                        f"(2WikiMultiHopQA/HotpotQA) or 'answers'/'passages' (generic JSONL) in {path}, found "
                        f"{keys} at line {line}; pass --format explicitly")
                fmt = detected
            record_id, question, answers, passages = _parse(record, fmt, require_passages)
        except _Malformed as e:
            if strict:
                raise DatasetError(f"{path}:{line}: {e} (strict mode; fix the record or run without --strict "
                                   "to skip it)") from None
            problems.append(Problem(line, str(e)))
            continue
        record_id = record_id if record_id is not None else f"line{line}"
        if record_id in seen:
            record_id = f"{record_id}@line{line}"
        seen.add(record_id)
        examples.append(EvalExample(record_id, question, answers, passages, line))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        detail = f"; first problem: {problems[0]}" if problems else ""
        raise DatasetError(f"expected at least one usable record in {path}, found none ({len(problems)} "
                           f"malformed){detail}")
    return Dataset(str(path), fmt if fmt != "auto" else "jsonl", examples, problems, file_digest(path))


# --- the synthetic task ---------------------------------------------------------------------------

def synthetic_examples(config=None, count: int = 200, split: str = "heldout") -> Dataset:
    """Examples of ``blockrag.train.synthetic``: the first question of each example and its passages.

    Args:
        config: a ``TaskConfig``, or a path to ``synthetic_task.json`` (or a directory holding one, e.g. a
            checkpoint trained on the task); None for the task's defaults.
        count: examples (indices 0..count-1 of the split).
        split: "heldout" (default) or "train".
    """
    try:
        from blockrag.train.synthetic import TASK_FILE, SyntheticTask, TaskConfig
    except ModuleNotFoundError as e:
        raise DatasetError(f"expected blockrag.train.synthetic for the synthetic task, found it missing ({e})"
                           ) from None
    if config is None:
        config = TaskConfig()
    elif not isinstance(config, TaskConfig):
        location = Path(config)
        file = location / TASK_FILE if location.is_dir() else location
        try:
            config = TaskConfig(**json.loads(file.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise DatasetError(f"expected a synthetic task config ({TASK_FILE}) at {file}, found "
                               f"{type(e).__name__}: {e}") from None
    task = SyntheticTask(config)
    examples = []
    for index in range(count):
        example = task.example(split, index)
        first = example.questions[0]
        examples.append(EvalExample(f"synthetic-{split}-{index}", first.text, (first.answer,),
                                    tuple(Passage(p) for p in example.passages)))
    digest = hashlib.sha256(json.dumps({"task": asdict(config), "split": split}, sort_keys=True).encode())
    return Dataset(f"synthetic:{split}", "synthetic", examples, [], digest.hexdigest())
