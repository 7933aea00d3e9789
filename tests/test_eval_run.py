"""The evaluation runner and ``blockrag eval``: both modes end to end, outputs, resume, bad input, shared blocks."""

import json
from pathlib import Path

import pytest

from blockrag.cli import main
from blockrag.eval.datasets import Dataset, EvalExample, load_dataset
from blockrag.eval.metrics import score
from blockrag.eval.runner import EvalSettings, ResumeMismatchError, run_eval
from blockrag.template import Passage

DATA = Path(__file__).parent / "data" / "eval"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _eval(*args: str) -> int:
    return main(["eval", "--no-progress", "--max-new-tokens", "3", *args])


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """A tiny untrained Llama saved like a checkpoint of the synthetic task (tokenizer, template, task config)."""
    from blockrag.train import synthetic
    from blockrag.train.data import save_template

    directory = tmp_path_factory.mktemp("synthetic_ckpt")
    config = synthetic.TaskConfig(entities=16, passages=3, questions=2, seed=5)
    tokenizer = synthetic.build_tokenizer(config)
    model = synthetic.new_model(tokenizer, hidden=32, layers=2, heads=2, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_template(synthetic.template(), directory)
    config.save(directory)
    return directory


def test_synthetic_task_end_to_end_in_block_and_full_mode(synthetic_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    rc = _eval("--data", "synthetic", "--model", str(synthetic_checkpoint), "--modes", "block,full",
               "--limit", "3", "--out", str(out))
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| block | 3 |" in printed and "| full | 3 |" in printed and "block vs full: TTFT p50" in printed
    assert (out / "chart.png").read_bytes()[:8] == PNG_MAGIC
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["template"] == "synthetic"          # block_template.json of the checkpoint
    assert run["settings"]["stop"] == [";"] and run["data"]["format"] == "synthetic"
    assert run["settings"]["k"] == 3                         # every passage of the task's examples
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["modes"]) == {"block", "full"} and summary["modes"]["block"]["n"] == 3
    records = _lines(out / "results.jsonl")
    assert [(r["id"], r["mode"]) for r in records] == [(f"synthetic-heldout-{i}", m) for i in range(3)
                                                       for m in ("block", "full")]
    for block, full in zip(records[::2], records[1::2]):
        assert block["context_tokens"] == full["context_tokens"] > 0     # the same prompt ids in both modes
        assert block["cached_tokens"] == block["context_tokens"]          # warm: all context KV was cached
        assert block["prefilled_tokens"] + block["context_tokens"] == full["prefilled_tokens"]
        assert full["cached_tokens"] == 0 and full["encoded_tokens"] == 0
        for r in (block, full):
            expected = score(r["prediction"], r["answers"])
            assert (r["accuracy"], r["em"]) == (expected.accuracy, expected.exact_match)
            # 2-hop answers ("e3 rome") span two passages, so containment in one passage is not guaranteed
            assert r["ttft_s"] > 0 and isinstance(r["answer_in_passages"], bool)
    assert summary["modes"]["block"]["accuracy"] == pytest.approx(
        100 * sum(r["accuracy"] for r in records[::2]) / 3)


def test_tiny_random_model_says_its_answers_are_noise_and_closed_book_has_no_passages(tmp_path, capsys):
    out = tmp_path / "out"
    rc = _eval("--data", str(DATA / "nq_dpr.json"), "--model", "tiny-random", "--modes", "block,full,closed-book",
               "--k", "2", "--out", str(out), "--no-chart")
    captured = capsys.readouterr()
    assert rc == 0
    assert "answers are noise" in captured.out and "answers are noise" in captured.err
    assert not (out / "chart.png").exists() and (out / "table.md").exists()
    records = _lines(out / "results.jsonl")
    closed = [r for r in records if r["mode"] == "closed-book"]
    assert len(closed) == 2 and all(r["passages"] == 0 and r["answer_in_passages"] is None for r in closed)
    assert all(r["passages"] == 2 for r in records if r["mode"] != "closed-book")   # --k 2 of 3 and of 2
    assert "tiny random model" in json.loads((out / "summary.json").read_text())["note"]


def test_resume_after_a_limited_run_keeps_earlier_answers_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--data", str(DATA / "generic.jsonl"), "--model", "tiny-random", "--out", str(out), "--no-chart"]
    assert _eval(*common, "--limit", "1") == 0
    first = (out / "results.jsonl").read_text()
    assert len(first.splitlines()) == 2
    capsys.readouterr()
    assert _eval(*common) == 0
    assert "resumed: 2 answers from an earlier run, 4 new" in capsys.readouterr().err
    text = (out / "results.jsonl").read_text()
    assert text.startswith(first) and len(text.splitlines()) == 6
    assert json.loads((out / "summary.json").read_text())["modes"]["full"]["n"] == 3
    assert _eval(*common) == 0
    assert "resumed: 6 answers from an earlier run, 0 new" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == text
    assert _eval(*common, "--k", "1") == 1
    assert "same settings" in capsys.readouterr().err and (out / "results.jsonl").read_text() == text
    assert _eval(*common, "--k", "1", "--overwrite") == 0
    assert all(r["passages"] == 1 for r in _lines(out / "results.jsonl"))


def test_interrupted_run_resumes_where_it_stopped(make_engine, tmp_path):
    engine = make_engine("llama")
    data = load_dataset(DATA / "generic.jsonl")
    settings = EvalSettings(modes=("block", "full"), k=2, max_new_tokens=2)
    seen = []

    def stop_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval(engine, data, tmp_path, settings, on_result=stop_after_three)
    results = tmp_path / "results.jsonl"
    assert len(results.read_text().splitlines()) == 3
    with results.open("a") as f:   # a write torn by the interruption: half a line, no newline
        f.write('{"id": "g3", "mode": "fu')
    same_file = load_dataset(f"{DATA}/../eval/generic.jsonl")   # spelled differently, same content: resumes
    outcome = run_eval(engine, same_file, tmp_path, settings)
    assert (outcome.resumed, outcome.new) == (3, 3)
    records = _lines(results)   # every line parses: the torn one was cut off
    assert [(r["id"], r["mode"]) for r in records] == [(i, m) for i in ("g1", "line2", "g3") for m in ("block", "full")]
    with pytest.raises(ResumeMismatchError, match="same model"):
        run_eval(make_engine("qwen2"), data, tmp_path, settings)
    with pytest.raises(ResumeMismatchError, match="same data"):
        run_eval(engine, load_dataset(DATA / "triviaqa_fid.jsonl"), tmp_path, settings)


def test_blocks_shared_across_questions_are_encoded_once(make_engine, tmp_path):
    engine = make_engine("llama")
    shared = [Passage("The Harwick line opened in 1887 with four halts.", "Harwick"),
              Passage("Its depot at Marsh End stores four carriages.", "Depot")]
    colours = ("red", "blue", "green")
    own = [Passage(f"Halt number {i} has a {c} signal lamp.", f"Halt {i}") for i, c in enumerate(colours)]
    examples = [EvalExample(f"q{i}", f"Which lamp is at halt {i}?", (c,), (shared[0], own[i], shared[1]))
                for i, c in enumerate(colours)]
    data = Dataset("shared", "jsonl", examples, digest="shared-v1")
    tokens = {p: len(engine.block_ids(p)) for p in shared + own}
    blocks_before = len(engine.store)

    records = run_eval(engine, data, tmp_path / "warm", EvalSettings(modes=("block", "full"), k=3,
                                                                     max_new_tokens=1)).records
    block = [r for r in records if r["mode"] == "block"]
    assert block[0]["encoded_tokens"] == tokens[shared[0]] + tokens[shared[1]] + tokens[own[0]]
    assert [r["encoded_tokens"] for r in block[1:]] == [tokens[own[1]], tokens[own[2]]]   # shared: cached
    assert all(r["cached_tokens"] == r["context_tokens"] for r in block)   # the timed request found all KV
    assert all(r["encoded_tokens"] == 0 for r in records if r["mode"] == "full")
    assert len(engine.store) - blocks_before == 5 + 1   # five distinct passages and the instruction block

    # ttft="cold": the engine's own usage of the timed request shows the same: only new blocks are encoded.
    cold_engine = make_engine("llama")
    cold = run_eval(cold_engine, data, tmp_path / "cold", EvalSettings(modes=("block",), k=3, max_new_tokens=1,
                                                                       ttft="cold")).records
    assert [r["encoded_tokens"] for r in cold] == [r["encoded_tokens"] for r in block]
    assert [r["cached_tokens"] for r in cold] == [r["context_tokens"] - r["encoded_tokens"] for r in cold]


def test_malformed_records_are_listed_and_skipped_or_refused_with_strict(tmp_path, capsys):
    common = ["--data", str(DATA / "malformed.jsonl"), "--model", "tiny-random", "--no-chart"]
    assert _eval(*common, "--out", str(tmp_path / "skip")) == 0
    err = capsys.readouterr().err
    for line in (2, 3, 4, 5, 7, 8, 9):
        assert f"malformed.jsonl:{line}: skipped malformed record" in err
    assert "skipped 7 malformed records" in err
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["modes"]["block"]["n"] == 2 and len(summary["skipped_records"]) == 7

    assert _eval(*common, "--out", str(tmp_path / "strict"), "--strict") == 1
    err = capsys.readouterr().err
    assert "error:" in err and "malformed.jsonl:2: expected one JSON object per line" in err
    assert not (tmp_path / "strict").exists()   # refused before any model or output

    # closed-book needs no passages: the record without any is then usable
    assert _eval(*common, "--out", str(tmp_path / "closed"), "--modes", "closed-book") == 0
    assert [r["id"] for r in _lines(tmp_path / "closed" / "results.jsonl")] == ["ok-1", "ok-2", "no-passages"]


def test_too_long_prompts_are_recorded_as_errors_not_scored(make_engine, tmp_path):
    engine = make_engine("llama")   # 1024 positions
    long_passage = Passage("word " * 1200)
    data = Dataset("long", "jsonl", [EvalExample("long", "Too long?", ("x",), (long_passage,)),
                                     EvalExample("short", "Short?", ("x",), (Passage("A short passage."),))],
                   digest="long-v1")
    outcome = run_eval(engine, data, tmp_path, EvalSettings(modes=("full",), max_new_tokens=1))
    long_record, short_record = outcome.records
    assert "at most 1024 positions" in long_record["error"] and long_record["prediction"] is None
    assert "error" not in short_record
    from blockrag.eval.report import summarize

    assert summarize(outcome.records, ["full"])["full"]["n"] == 1
    assert summarize(outcome.records, ["full"])["full"]["errors"] == 1


def test_passages_retrieved_from_a_knowledge_base(tmp_path, capsys):
    corpus = Path(__file__).parent / "kb_corpus"
    kb = tmp_path / "kb"
    assert main(["ingest", str(corpus / "duck.txt"), str(corpus / "bread.md"), str(corpus / "river.txt"),
                 "--kb", str(kb), "--model", "tiny-random", "--no-progress"]) == 0
    out = tmp_path / "out"
    # questions.json has no passages: with --kb they come from the knowledge base; the model is the KB's.
    assert _eval("--data", str(corpus / "questions.json"), "--kb", str(kb), "--k", "2", "--limit", "3",
                 "--out", str(out), "--no-chart") == 0
    records = _lines(out / "results.jsonl")
    assert len(records) == 6 and all(len(r["sources"]) == 2 == r["passages"] for r in records)
    assert all(r["sources"][0]["score"] >= r["sources"][1]["score"] for r in records)
    # ingest already stored every passage's KV: block mode encodes nothing at question time
    assert all(r["encoded_tokens"] == 0 and r["cached_tokens"] == r["context_tokens"] > 0
               for r in records if r["mode"] == "block")
    assert json.loads((out / "run.json").read_text())["kb"] == str(kb)
    capsys.readouterr()


def test_progress_bar_counts_resumed_and_new_answers(make_engine, tmp_path, capsys):
    engine = make_engine("llama")
    data = load_dataset(DATA / "triviaqa_fid.jsonl")
    settings = EvalSettings(modes=("full",), max_new_tokens=1)
    run_eval(engine, Dataset(data.source, data.format, data.examples[:1], digest=data.digest), tmp_path, settings)
    capsys.readouterr()
    run_eval(engine, data, tmp_path, settings, progress=True)
    err = capsys.readouterr().err
    assert "eval: 100%" in err and "2/2" in err and "full " in err   # postfix: running accuracy per mode


def test_every_eval_option_has_help_text():
    import argparse

    from blockrag.eval.cli import add_parser

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {"--data", "--format", "--model", "--modes", "--k", "--max-new-tokens", "--out", "--kb", "--limit",
            "--strict"} <= {s for a in options for s in a.option_strings}
    assert all(a.help and len(a.help) > 10 for a in options)


def test_import_blockrag_does_not_import_the_evaluation_package():
    import subprocess
    import sys

    code = "import sys, blockrag; print(any(m.startswith('blockrag.eval') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
