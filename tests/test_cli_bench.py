"""``blockrag bench`` on the tiny random model: files and fields, usage numbers, default folder, refused input.

No timing is asserted: speed is what the command measures, not what these tests check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from kb_helpers import torch_threads

from blockrag import cli
from blockrag.bench import build_passages, format_table

SIZES = (128, 256)
TINY = ("--model", "tiny-random", "--passage-tokens", "64", "--threads", "1")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):  # NOTE: --threads 1 sets torch's global; this restores it after the module
        yield


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def engine():
    from blockrag.cli_common import load_engine

    return load_engine("tiny-random", quiet=True)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One run: (exit code, stdout, output folder)."""
    out = tmp_path_factory.mktemp("bench") / "new" / "folder"  # parents are created too
    with pytest.MonkeyPatch.context() as patch:
        import io

        stdout = io.StringIO()
        patch.setattr(sys, "stdout", stdout)
        code = cli.main(["bench", *TINY, "--sizes", ",".join(map(str, SIZES)), "--repeats", "2", "--out", str(out)])
    return code, stdout.getvalue(), out


def test_writes_results_and_table_and_ends_with_the_json_line(bench_run):
    code, stdout, out = bench_run
    assert code == 0
    last = json.loads(stdout.strip().splitlines()[-1])
    written = json.loads((out / "results.json").read_text())
    assert last == written
    for field in ("model", "device", "device_type", "dtype", "threads", "torch", "transformers", "blockrag",
                  "commit", "date", "question", "passage_tokens", "repeats", "warmup", "out", "rows"):
        assert field in written, field
    assert written["model"] == "tiny-random" and written["device_type"] == "cpu" and written["dtype"] == "float32"
    assert written["threads"] == 1 and written["repeats"] == 2 and written["out"] == str(out)
    assert written["cuda_graphs"] is None  # off unless asked for (CUDA only)
    assert [row["size"] for row in written["rows"]] == list(SIZES)
    for row in written["rows"]:
        for mode in ("block", "full"):
            assert len(row[mode]["times_ms"]) == 2 and row[mode]["median_ms"] > 0
        assert row["full_over_block"] == pytest.approx(row["full"]["median_ms"] / row["block"]["median_ms"],
                                                       rel=1e-2)
        assert row["load_avg_before"] is None or len(row["load_avg_before"]) == 3
        assert row["load_avg_after"] is None or len(row["load_avg_after"]) == 3
        assert row["encode_ms"] > 0 and row["passages"] >= 1
    table = (out / "table.md").read_text()
    assert table in stdout  # the printed table is the written one
    assert "| context tokens |" in table and "full / block" in table and "load avg" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]) == len(SIZES)
    assert format_table(written) == table  # results.json alone renders the table again


def test_block_mode_prefills_only_the_question(bench_run, engine):
    """Usage numbers, not timing: block mode reads the whole context from cache and prefills the final block."""
    written = json.loads((bench_run[2] / "results.json").read_text())
    question_tokens = len(engine.final_ids(written["question"]))
    for row in written["rows"]:
        block, full = row["block"], row["full"]
        assert row["question_tokens"] == question_tokens
        assert row["prompt_tokens"] == row["context_tokens"] + question_tokens
        assert block["prefilled_tokens"] == question_tokens
        assert block["cached_tokens"] == row["context_tokens"] and block["encoded_tokens"] == 0
        assert full["prefilled_tokens"] == row["prompt_tokens"] and full["cached_tokens"] == 0
        assert abs(row["context_tokens"] - row["size"]) <= 0.1 * row["size"]  # "about that many"


def test_passages_are_deterministic_and_fill_the_size(engine):
    first = build_passages(engine, 300, 64, seed="s")
    assert build_passages(engine, 300, 64, seed="s") == first
    assert build_passages(engine, 300, 64, seed="other") != first
    assert all(len(engine.block_ids(p)) <= 64 for p in first)
    context = len(engine.prefix_ids()) + sum(len(engine.block_ids(p)) for p in first)
    assert abs(context - 300) <= 30


def test_json_only_and_the_default_folder_is_a_new_temporary_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, out, err = run_cli(capsys, *TINY, "--sizes", "128", "--repeats", "1", "--warmup", "0", "--json")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    folder = Path(result["out"])
    assert folder.parent == tmp_path and folder.name.startswith("blockrag-bench-")
    assert (folder / "results.json").is_file() and (folder / "table.md").is_file()
    assert str(folder) in err  # the folder is printed


@pytest.mark.parametrize(("argv", "message"), [
    (("--sizes", "1024,abc"), "expected --sizes as comma-separated positive integers"),
    (("--sizes", "0"), "expected --sizes as comma-separated positive integers"),
    (("--sizes=-5",), "expected --sizes as comma-separated positive integers"),
    (("--repeats", "0"), "expected --repeats >= 1, found 0"),
    (("--threads", "0"), "expected --threads >= 1, found 0"),
    (("--out", "{file}"), "expected --out to be a directory (created if missing), found the file"),
    (("--out", "{file}/below"), "expected --out to be a directory that can be created"),
    (("--model", "smolm2-135m"), "unknown model 'smolm2-135m'"),
    (("--cuda-graphs", "0"), "expected --cuda-graphs >= 1 (context tokens), found 0"),
    (("--device", "cpu", "--cuda-graphs", "4096"), "expected --cuda-graphs on a CUDA device, found cpu"),
    pytest.param(("--device", "cuda"), "expected a CUDA GPU", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="CUDA is present here")),
])
def test_bad_input_is_one_line_before_the_model_loads(argv, message, tmp_path, capsys):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    argv = [a.format(file=file) for a in argv]
    code, out, err = run_cli(capsys, "--model", "tiny-random", *argv) if "--model" not in argv else run_cli(
        capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "tiny random model" not in err  # refused before the model was loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]  # nothing created


def test_sizes_the_model_cannot_hold_are_refused_before_encoding(tmp_path, capsys):
    code, out, err = run_cli(capsys, *TINY, "--sizes", "128,5000", "--out", tmp_path / "out")
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("error: expected --sizes up to") and "1024 positions" in err
    assert not (tmp_path / "out").exists()


def test_a_real_process_exits_with_one_line_and_no_traceback(tmp_path):
    file = tmp_path / "taken"
    file.write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(cli.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "blockrag", "bench", "--model", "tiny-random", "--out", str(file)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: expected --out to be a directory") and proc.stderr.count("\n") == 1
