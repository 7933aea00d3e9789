"""The evaluation's recovery and ablation modes: block-noreencode, recompute (selective recompute), fp8 KV."""

import json

import pytest
import torch

from blockrag.cli import main
from blockrag.errors import InvalidInputError
from blockrag.eval.datasets import load_dataset
from blockrag.eval.runner import EvalSettings, evaluate_example, run_eval

PASSAGES = ["Paris is the capital of France.", "The fox jumps over the lazy dog.", "Rotary keys rotate by position.",
            "Block attention caches each passage on its own."]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "short.jsonl"
    rows = [{"id": f"q{i}", "question": f"What is item {i}?", "answers": ["Paris"],
             "passages": [{"text": p} for p in PASSAGES[i:] + PASSAGES[:i]]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_modes_answer_as_the_engine_does(make_engine, data_file):
    engine = make_engine("llama")
    data = load_dataset(data_file, "jsonl", strict=True)
    example = data.examples[0]
    passages = list(example.passages[:2])
    settings = EvalSettings(modes=("block-noreencode", "recompute"), k=2, max_new_tokens=3, recompute="first:4")
    plain = evaluate_example(engine, example, "block-noreencode", settings)
    expected = engine.generate(passages, example.question, reencode=False, max_new_tokens=3)
    assert plain["prediction"] == expected.text and plain["recomputed_tokens"] == 0
    recovered = evaluate_example(engine, example, "recompute", settings)
    expected = engine.generate(passages, example.question, recompute="first:4", max_new_tokens=3)
    assert recovered["prediction"] == expected.text
    assert recovered["recomputed_tokens"] == expected.usage.recomputed_tokens == 4 * len(passages)
    everything = evaluate_example(engine, example, "recompute", EvalSettings(modes=("recompute",), k=2,
                                                                             max_new_tokens=3, recompute="all"))
    full = evaluate_example(engine, example, "full", settings)
    assert everything["prediction"] == full["prediction"]


def test_fp8_kv_serves_quantized_blocks_from_the_store(make_engine, data_file):
    engine = make_engine("qwen2")
    example = load_dataset(data_file, "jsonl", strict=True).examples[1]
    settings = EvalSettings(modes=("block",), k=3, max_new_tokens=2, kv="fp8")
    record = evaluate_example(engine, example, "block", settings)
    keys = [engine.key_of(engine.block_ids(p)) for p in example.passages[:3]]
    assert all(block.quantized for block in engine.store.get_many(keys))
    assert record["cached_tokens"] == record["context_tokens"]  # the timed request found every block cached
    native = make_engine("qwen2")
    fp8_logits = engine.prefill(list(example.passages[:3]), example.question).logits
    native_logits = native.prefill(list(example.passages[:3]), example.question).logits
    difference = (fp8_logits - native_logits).abs().max()
    assert 0 < difference < 0.5  # quantization error is there, and small
    torch.testing.assert_close(native.prefill(list(example.passages[:3]), example.question).logits, native_logits)


def test_settings_refuse_incomplete_recovery_options():
    with pytest.raises(InvalidInputError, match="recompute selection"):
        EvalSettings(modes=("recompute",))
    with pytest.raises(InvalidInputError, match="expected a recompute selection"):
        EvalSettings(modes=("recompute",), recompute="some")
    with pytest.raises(InvalidInputError, match="kv"):
        EvalSettings(kv="int3")
    with pytest.raises(InvalidInputError, match="warm"):
        EvalSettings(kv="fp8", ttft="cold")
    assert EvalSettings(modes=("recompute",), recompute="deviation:10%").recompute == "deviation:0.1"
    assert "recompute" not in EvalSettings().fingerprint()  # earlier results directories still resume


def test_cli_runs_each_recovery_row_with_one_command(data_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--no-progress", "--no-chart", "--data", str(data_file), "--model", "tiny-random", "--k", "3",
               "--modes", "block,block-noreencode,recompute", "--recompute", "first:2+query:0.1",
               "--max-new-tokens", "2", "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in records} == {"block", "block-noreencode", "recompute"}
    assert all(not r.get("error") for r in records)
    assert all(r["recomputed_tokens"] >= 6 for r in records if r["mode"] == "recompute")
    assert json.loads((out / "run.json").read_text())["settings"]["recompute"] == "first:2+query:0.1"
    assert "recomputed tok/q" in (out / "table.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--no-progress", "--data", str(data_file), "--model", "tiny-random", "--modes", "block",
                 "--recompute", "first:2", "--out", str(tmp_path / "x")]) == 1
    assert "include recompute" in capsys.readouterr().err


def test_run_eval_resumes_a_recompute_run_only_with_the_same_selection(make_engine, data_file, tmp_path):
    from blockrag.eval.runner import ResumeMismatchError

    engine = make_engine("llama")
    data = load_dataset(data_file, "jsonl", strict=True, limit=1)
    run_eval(engine, data, tmp_path, EvalSettings(modes=("recompute",), k=2, max_new_tokens=1, recompute="first:2"))
    with pytest.raises(ResumeMismatchError):
        run_eval(engine, data, tmp_path, EvalSettings(modes=("recompute",), k=2, max_new_tokens=1,
                                                      recompute="first:3"))
