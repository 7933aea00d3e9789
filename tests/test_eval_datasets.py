"""Loaders of the paper's RAG formats (2Wiki/HotpotQA, NQ/TriviaQA DPR/FiD), generic JSONL and auto detection."""

import gzip
import json
from pathlib import Path

import pytest

from blockrag.eval.datasets import DatasetError, detect_format, load_dataset, synthetic_examples

DATA = Path(__file__).parent / "data" / "eval"


@pytest.mark.parametrize("name, fmt, count", [
    ("hotpotqa.json", "hotpot", 2),
    ("2wikimultihopqa.json", "hotpot", 2),
    ("hotpot_hf_layout.jsonl", "hotpot", 2),
    ("nq_dpr.json", "dpr", 2),
    ("triviaqa_fid.jsonl", "dpr", 2),
    ("generic.jsonl", "jsonl", 3),
])
def test_auto_detects_every_fixture_and_matches_the_explicit_format(name, fmt, count):
    auto = load_dataset(DATA / name, "auto")
    explicit = load_dataset(DATA / name, fmt)
    assert auto.format == fmt and len(auto.examples) == count and not auto.problems
    assert auto.examples == explicit.examples
    for example in auto.examples:
        assert example.question and example.answers and example.passages


def test_format_aliases_and_wrong_explicit_format():
    assert load_dataset(DATA / "nq_dpr.json", "nq").format == "dpr"
    assert load_dataset(DATA / "2wikimultihopqa.json", "2wiki").format == "hotpot"
    with pytest.raises(DatasetError, match="expected a format in"):
        load_dataset(DATA / "nq_dpr.json", "squad")
    # A DPR file read as hotpot has no 'answer' nor 'context' passages: every record is malformed.
    with pytest.raises(DatasetError, match=r"found none \(2 malformed\)"):
        load_dataset(DATA / "nq_dpr.json", "hotpot")


def test_hotpot_paragraphs_keep_order_and_join_sentences_as_written():
    data = load_dataset(DATA / "hotpotqa.json")
    first = data.examples[0]
    assert first.id == "5a8b57f25542995d1e6f1371" and first.answers == ("yes",) and first.line == 2
    assert [p.title for p in first.passages] == ["Ed Wood (film)", "Scott Derrickson", "Ed Wood"]
    # HotpotQA sentences carry their leading space: joined as is, not doubled.
    assert first.passages[1].text == ("Scott Derrickson (born July 16, 1966) is an American director, screenwriter "
                                      "and producer. He lives in Los Angeles, California.")
    assert data.examples[1].line == 15
    # 2Wiki sentences have no leading space: one is inserted.
    wiki = load_dataset(DATA / "2wikimultihopqa.json").examples[0]
    assert "Polish film director. In 1995 he graduated" in wiki.passages[0].text


def test_hotpot_hugging_face_layout_and_json_string_context():
    a, b = load_dataset(DATA / "hotpot_hf_layout.jsonl").examples
    assert [p.title for p in a.passages] == ["Kelmscott", "Lechlade"]
    assert a.passages[0].text == "Kelmscott is a village in Oxfordshire. It lies near the River Thames."
    assert [p.title for p in b.passages] == ["Lechlade", "Kelmscott"] and b.answers == ("Gloucestershire",)


def test_dpr_passages_sorted_by_score_even_when_scores_are_strings():
    first, second = load_dataset(DATA / "nq_dpr.json").examples
    assert [p.title for p in first.passages] == ["Wilhelm Röntgen", "Nobel Prize in Physics", "Nobel Prize"]
    assert first.id == "line2" and second.id == "line12"   # no ids in the DPR NQ file: the starting line
    assert second.answers == ("May 18, 2018", "May 2018")


def test_fid_answers_take_precedence_over_target():
    first, second = load_dataset(DATA / "triviaqa_fid.jsonl").examples
    assert first.answers == ("Sunset Boulevard", "Sunset Blvd", "West Sunset Boulevard")
    assert second.answers == ("David Seville", "Ross Bagdasarian")


def test_generic_jsonl_accepts_strings_objects_single_answer_and_blank_lines():
    g1, g2, g3 = load_dataset(DATA / "generic.jsonl").examples
    assert g1.answers == ("green", "emerald") and g1.passages[0].title == "Harwick branch"
    assert g1.passages[2].title is None   # a bare string passage; mixed scores keep the file's order
    assert g2.id == "line2" and g2.answers == ("four",)
    assert g3.line == 4 and g3.answers == ("Ada Marsh",)   # line 3 is blank


def test_malformed_records_are_reported_with_line_numbers_and_skipped():
    data = load_dataset(DATA / "malformed.jsonl")
    assert [e.id for e in data.examples] == ["ok-1", "ok-2"]
    problems = {p.line: p.message for p in data.problems}
    assert sorted(problems) == [2, 3, 4, 5, 7, 8, 9]
    assert "invalid JSON" in problems[2]
    assert "'answers' or 'answer'" in problems[3]
    assert "'question' as a non-empty string, found int 42" in problems[4]
    assert "found list" in problems[5]
    assert "non-empty list of strings, found list []" in problems[7]
    assert "'passages' as a list, found str" in problems[8]
    assert "at least one passage" in problems[9]
    assert str(data.problems[0]).startswith("line 2: ")


def test_strict_refuses_the_first_malformed_record_with_its_line():
    with pytest.raises(DatasetError, match=r"malformed\.jsonl:2: expected one JSON object per line"):
        load_dataset(DATA / "malformed.jsonl", strict=True)


def test_passages_optional_when_not_required():
    data = load_dataset(DATA / "malformed.jsonl", require_passages=False)
    assert [e.id for e in data.examples] == ["ok-1", "ok-2", "no-passages"]
    assert data.examples[-1].passages == ()


def test_json_array_syntax_error_is_fatal_with_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"question": "q", "answers": ["a"], "passages": ["p"]},\n {"question": "r",,}\n]\n')
    with pytest.raises(DatasetError, match="line 3"):
        load_dataset(path)


def test_limit_duplicate_ids_gzip_and_unrecognised_records(tmp_path):
    rows = [{"id": "same", "question": f"q{i}?", "answers": ["a"], "passages": ["p"]} for i in range(4)]
    path = tmp_path / "dups.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    data = load_dataset(path, limit=3)
    assert [e.id for e in data.examples] == ["same", "same@line2", "same@line3"]
    other = tmp_path / "squad.jsonl"
    other.write_text(json.dumps({"title": "x", "paragraphs": []}) + "\n")
    with pytest.raises(DatasetError, match="pass --format explicitly"):
        load_dataset(other)
    assert detect_format({"question": "q", "ctxs": []}) == "dpr"
    assert detect_format({"question": "q", "context": []}) == "hotpot"
    assert detect_format({"question": "q", "answers": []}) == "jsonl"
    assert detect_format({"query": "q"}) is None


def test_synthetic_examples_are_deterministic_and_answerable_from_their_passages():
    a = synthetic_examples(count=5)
    b = synthetic_examples(count=5)
    assert a.examples == b.examples and a.digest == b.digest and a.format == "synthetic"
    for example in a.examples:
        (answer,) = example.answers
        # every word of the answer (bridge entity and value) is stated in some passage
        assert all(any(word in p.text.split() for p in example.passages) for word in answer.split())
    assert synthetic_examples(count=2, split="train").examples[0] != a.examples[0]
