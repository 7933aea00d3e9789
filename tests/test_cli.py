"""The blockrag command line: ingest in one process, ask in another; maintenance commands; errors; extensions."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from kb_helpers import CORPUS, embedder, questions, torch_threads

from blockrag import cli


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "kb"
    code = cli.main(["ingest", str(CORPUS), "--kb", str(path), "--model", "tiny-random", "--chunk-tokens", "128",
                     "--chunk-overlap", "16", "--no-progress"])
    assert code == 0
    return path


def all_actions(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_actions(sub, f"{prefix}{name} ")
        else:
            yield prefix, action


def test_every_option_has_help_text(capsys):
    parser, _ = cli.build_parser(["ask"])
    actions = list(all_actions(parser))
    assert len(actions) > 40
    for where, action in actions:
        assert action.help and action.help != argparse.SUPPRESS, f"no help for {where}{action.dest}"
    for argv in (["--help"], ["ingest", "--help"], ["ask", "--help"], ["kb", "stats", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "COMMAND" in out and "--chunk-tokens" in out and "--stream" in out and "--verify" in out


def test_ingest_reports_and_warns_about_the_tiny_model(tmp_path, capsys):
    code, out, err = run_cli(capsys, "ingest", CORPUS / "duck.txt", CORPUS / "facts.jsonl", "--kb", tmp_path / "kb",
                             "--model", "tiny-random", "--no-progress", "--json")
    assert code == 0
    assert "tiny random model" in err and "answers are noise" in err
    result = json.loads(out)
    assert result["report"]["documents_added"] == 4 and result["stats"]["model"]["name"] == "tiny-random"
    code, out, err = run_cli(capsys, "ingest", CORPUS / "duck.txt", "--kb", tmp_path / "kb", "--no-progress")
    assert code == 0 and "0 added, 0 updated, 1 skipped" in out  # model taken from the knowledge base


def test_ask_in_a_new_process_uses_the_stored_blocks(kb_dir):
    q = questions()[5]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "blockrag.cli", "ask", q["question"], "--kb", str(kb_dir), "--k", "3",
                           "--max-new-tokens", "4", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"] == "tiny-random" and "answers are noise" in proc.stderr
    # The new process rebuilt the same tiny model (same fingerprint), so every context block came from disk.
    assert result["usage"]["encoded_tokens"] == 0 and result["usage"]["cached_tokens"] > 0
    assert result["sources"][0]["doc_id"] == q["doc_id"] and q["answer"] in result["sources"][0]["text"]
    assert result["usage"]["ttft_s"] > 0 and result["usage"]["generated_tokens"] <= 4


def test_ask_prints_answer_sources_and_usage(kb_dir, capsys):
    code, out, _ = run_cli(capsys, "ask", questions()[0]["question"], "--kb", kb_dir, "--k", "2",
                           "--max-new-tokens", "3", "--stream")
    assert code == 0
    assert "sources:\n  [1] " in out and "observatory.md" in out
    usage = out.strip().splitlines()[-1]
    assert usage.startswith("usage: TTFT ") and "mode block" in usage and "0 encoded now" in usage
    code, out, _ = run_cli(capsys, "ask", "What is Velorin?", "--kb", kb_dir, "--mode", "full", "--json",
                           "--max-new-tokens", "2")
    usage = json.loads(out)["usage"]
    assert code == 0 and usage["cached_tokens"] == 0 and usage["prefilled_tokens"] > 100


def test_kb_stats_list_delete_and_gc(kb_dir, tmp_path, capsys):
    path = tmp_path / "kb"
    import shutil

    shutil.copytree(kb_dir, path)
    code, out, _ = run_cli(capsys, "kb", "stats", "--kb", path, "--verify", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["documents"] == 11 and stats["verify"]["ok"]
    code, out, _ = run_cli(capsys, "kb", "stats", "--kb", path)
    assert code == 0 and "passages: " in out and "kv_bytes: " in out
    code, out, _ = run_cli(capsys, "kb", "list", "--kb", path)
    ids = out.split()
    assert code == 0 and "dunmore" in ids and len(ids) == 11
    code, out, err = run_cli(capsys, "kb", "delete", "dunmore", "nope", "--kb", path)
    assert code == 1 and "deleted 1 documents" in out and "no document with id 'nope'" in err
    (path / "kv" / "ab").mkdir(exist_ok=True)
    orphan = path / "kv" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    orphan.write_bytes(b"left by a crash")
    code, out, _ = run_cli(capsys, "kb", "gc", "--kb", path)
    assert code == 0 and "deleted 1 unreferenced KV files" in out and not orphan.exists()
    code, out, _ = run_cli(capsys, "kb", "stats", "--kb", path, "--json")
    assert json.loads(out)["documents"] == 10


def test_strict_refuses_a_damaged_block_and_default_recomputes_it(kb_dir, tmp_path, capsys, caplog):
    import shutil

    path = tmp_path / "kb"
    shutil.copytree(kb_dir, path)
    question = questions()[2]["question"]
    code, out, _ = run_cli(capsys, "ask", question, "--kb", path, "--k", "1", "--json", "--max-new-tokens", "1")
    hit = json.loads(out)["sources"][0]
    file = path / "kv" / hit["block_key"][:2] / f"{hit['block_key']}.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 1
    file.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "ask", question, "--kb", path, "--k", "1", "--strict", "--max-new-tokens", "1")
    assert code == 1 and "error: " in err and "checksum" in err and "strict" in err
    code, out, err = run_cli(capsys, "ask", question, "--kb", path, "--k", "1", "--json", "--max-new-tokens", "1")
    assert code == 0 and json.loads(out)["usage"]["encoded_tokens"] == hit["token_count"]
    assert "discarding KV file" in caplog.text  # logged as a warning (stderr outside pytest)


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    code, _, err = run_cli(capsys, "ask", "Why?", "--kb", tmp_path / "plain")
    assert code == 1 and "expected a knowledge base at" in err and "no manifest" in err
    code, _, err = run_cli(capsys, "kb", "stats", "--kb", tmp_path / "missing")
    assert code == 1 and "found nothing" in err
    code, _, err = run_cli(capsys, "ingest", tmp_path / "nope.txt", "--kb", tmp_path / "kb", "--model", "tiny-random")
    assert code == 1 and "found nothing at" in err
    (tmp_path / "doc.txt").write_text("Some text.")
    code, _, err = run_cli(capsys, "ingest", tmp_path / "doc.txt", "--kb", tmp_path / "kb", "--model", "smolm2-135m")
    assert code == 1 and "did you mean 'smollm2-135m'" in err and not (tmp_path / "kb").exists()
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "ingest", tmp_path / "empty", "--kb", tmp_path / "kb2", "--model", "tiny-random",
                           "--no-progress")
    assert code == 1 and "no files matching" in err and "found none" in err
    assert not (tmp_path / "kb2").exists()  # nothing is created without documents
    assert run_cli(capsys, "ingest", tmp_path / "doc.txt", "--kb", tmp_path / "kb2", "--model", "tiny-random",
                   "--no-progress")[0] == 0
    assert run_cli(capsys, "kb", "delete", tmp_path / "doc.txt", "--kb", tmp_path / "kb2")[0] == 0
    code, _, err = run_cli(capsys, "ask", "Anything?", "--kb", tmp_path / "kb2")
    assert code == 1 and "empty knowledge base" in err
    code, _, err = run_cli(capsys, "ask", "Anything?", "--kb", tmp_path / "kb2", "--k", "0")
    assert code == 1 and "expected --k to be at least 1" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["ask", "x", "--kb", str(tmp_path), "--mode", "fast"])
    assert info.value.code == 2


def test_subcommands_are_registered_explicitly_and_imported_only_when_asked():
    """One ``main``: finetune, eval, serve and bench are registered by blockrag.cli, each module imported only for
    its own command (or for the full help), never for blockrag's own commands."""
    assert cli.SUBCOMMANDS == ("finetune", "eval", "serve", "bench")
    assert cli.build_parser(["ask", "q?"])[1] == {}
    assert set(cli.build_parser(["eval"])[1]) == {"eval"}
    parser, runners = cli.build_parser([])
    assert set(runners) == {"finetune", "eval", "serve", "bench"}
    assert set(cli.build_parser(["bench"])[1]) == {"bench"}
    usage = parser.format_help()
    assert all(name in usage for name in ("ingest", "ask", "chat", "kb", "finetune", "eval", "serve", "bench"))


def blockrag(*argv, cwd=None, stdin=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(cli.__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "blockrag.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd, input=stdin)


def kv_files(path) -> set[str]:
    return {p.name for p in (path / "kv").glob("*/*.safetensors")}


@pytest.mark.slow  # ten processes, each loading a model
def test_a_second_model_is_added_and_gc_keeps_the_first_models_kv(tmp_path):
    path = tmp_path / "kb"
    proc = blockrag("ingest", CORPUS / "duck.txt", CORPUS / "bread.md", "--kb", path, "--model", "tiny-random",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr
    files_a = kv_files(path)
    question = "What do ducks eat?"
    # another model asks: it is added (its blocks encoded now), the first model's KV and the default stay
    proc = blockrag("ask", question, "--kb", path, "--model", "tiny-random:qwen2", "--k", "2", "--max-new-tokens",
                    "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "adding it" in proc.stderr and json.loads(proc.stdout)["usage"]["encoded_tokens"] > 0
    stats = json.loads(blockrag("kb", "stats", "--kb", path, "--json").stdout)
    assert [m["name"] for m in stats["models"]] == ["tiny-random", "tiny-random:qwen2"]
    assert stats["model"]["name"] == "tiny-random" and stats["orphan_blocks"] == 0
    proc = blockrag("kb", "gc", "--kb", path)
    assert proc.returncode == 0 and "deleted 0 unreferenced KV files" in proc.stdout
    assert files_a < kv_files(path)  # the second model's blocks were added, none of the first model's lost
    # refusing is still possible, and says how to proceed
    proc = blockrag("ask", question, "--kb", path, "--model", "tiny-random:mistral", "--on-mismatch", "refuse")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: ") and "--on-mismatch add" in proc.stderr.splitlines()[-1]
    # the default model answers from its own blocks, in a new process
    proc = blockrag("ask", question, "--kb", path, "--k", "2", "--max-new-tokens", "2", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["usage"]["encoded_tokens"] == 0, proc.stderr
    # dropping a model is explicit; only then gc deletes its files
    proc = blockrag("kb", "forget-model", "tiny-random:qwen2", "--kb", path)
    assert proc.returncode == 0 and "forgot model 'tiny-random:qwen2'" in proc.stdout, proc.stderr
    proc = blockrag("kb", "gc", "--kb", path)
    assert proc.returncode == 0 and kv_files(path) == files_a
    proc = blockrag("kb", "stats", "--kb", path, "--verify", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["verify"]["ok"]
    proc = blockrag("kb", "forget-model", "tiny-random", "--kb", path)
    assert proc.returncode == 1 and "only model" in proc.stderr


@pytest.mark.slow  # three processes, each loading a model
def test_model_paths_are_recorded_absolute_and_an_unloadable_recorded_model_is_one_line(tmp_path, make_engine):
    from blockrag.index import KnowledgeBase
    from blockrag.testing import tiny_pipeline

    model, tokenizer = tiny_pipeline("llama", seed=0)
    (tmp_path / "models").mkdir()
    model.save_pretrained(tmp_path / "models" / "tiny")
    tokenizer.save_pretrained(tmp_path / "models" / "tiny")
    proc = blockrag("ingest", CORPUS / "duck.txt", "--kb", "kb", "--model", "models/tiny", "--no-progress",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    recorded = KnowledgeBase.info(tmp_path / "kb")["model"]["name"]
    assert recorded == str((tmp_path / "models" / "tiny").resolve())
    (tmp_path / "elsewhere").mkdir()
    proc = blockrag("ask", "What do ducks eat?", "--kb", "../kb", "--k", "1", "--max-new-tokens", "2", "--json",
                    cwd=tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["usage"]["encoded_tokens"] == 0  # the same model, loaded from another folder
    # a knowledge base built in Python from an in-memory model records a name the CLI cannot load
    with KnowledgeBase.create(tmp_path / "py_kb", make_engine("llama"), embedder()) as kb:
        kb.add_paths([CORPUS / "duck.txt"])
        name = kb.stats()["model"]["name"]
    proc = blockrag("ask", "What do ducks eat?", "--kb", tmp_path / "py_kb")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: expected to load the model the knowledge base") and repr(name) in proc.stderr
    assert "pass --model NAME_OR_PATH" in proc.stderr


def test_list_into_a_closed_pipe_delete_by_path_empty_folders_and_early_validation(kb_dir, tmp_path):
    import shutil

    path = shutil.copytree(kb_dir, tmp_path / "kb")
    proc = subprocess.run(f"{sys.executable} -m blockrag.cli kb list --kb {path} | head -n 1", shell=True,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(cli.__file__))})
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1 and proc.stderr == "", proc.stderr
    # delete by the path given to ingest (relative to the current folder) and by a document id from `kb list`
    proc = blockrag("kb", "delete", "duck.txt", "dunmore", "--kb", path, cwd=CORPUS)
    assert proc.returncode == 0 and "deleted 2 documents" in proc.stdout, proc.stderr
    ids = blockrag("kb", "list", "--kb", path).stdout.split()
    assert str(CORPUS.resolve() / "duck.txt") not in ids and "dunmore" not in ids and len(ids) == 9
    # an empty folder creates nothing
    (tmp_path / "empty").mkdir()
    proc = blockrag("ingest", tmp_path / "empty", "--kb", tmp_path / "new_kb", "--model", "tiny-random")
    assert proc.returncode == 1 and "found none; nothing was created" in proc.stderr
    assert not (tmp_path / "new_kb").exists()
    # bad questions and --k are refused before a model is loaded (no tiny-model note: it never loaded)
    for argv, message in ((["", "--k", "2"], "expected a non-empty question"), (["Why?", "--k", "0"], "--k")):
        proc = blockrag("ask", *argv, "--kb", path)
        assert proc.returncode == 1 and message in proc.stderr and "tiny random" not in proc.stderr, proc.stderr


def test_ask_json_stream_lines_generation_flags_and_full_mode_context(kb_dir, capsys):
    q = questions()[0]["question"]
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "6", "--stream", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) >= 2 and [x["type"] for x in lines[:-1]] == ["delta"] * (len(lines) - 1)
    result = lines[-1]
    assert result["type"] == "result" and "".join(x["text"] for x in lines[:-1]) == result["answer"]
    greedy = result["answer"]
    # --top-k 1 samples from the single most likely token: the greedy answer, whatever the temperature
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "6", "--json",
                           "--temperature", "5", "--top-k", "1", "--seed", "3")
    assert code == 0 and json.loads(out)["answer"] == greedy
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "6", "--json",
                           "--temperature", "5", "--seed", "3")
    assert json.loads(out)["answer"] != greedy  # control: without --top-k the hot sampler wanders off
    assert len(greedy) >= 4, greedy
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "6", "--json",
                           "--stop", greedy[2:4])
    stopped = json.loads(out)
    assert stopped["answer"] == greedy[:greedy.index(greedy[2:4])] and stopped["finish_reason"] == "stop"
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "2", "--json",
                           "--instruction", "Answer in one word.", "--threads", "1")
    other = json.loads(out)
    assert code == 0 and other["usage"]["encoded_tokens"] > 0 and other["threads"] == 1  # a new block 0, encoded
    assert other["context_tokens"] != result["context_tokens"]
    # --mode full reports the context it prefilled, like block mode does
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "2", "--mode", "full")
    usage = out.strip().splitlines()[-1]
    assert code == 0 and f"context {result['context_tokens']} tokens (0 cached, 0 encoded now)" in usage
    code, _, err = run_cli(capsys, "ask", q, "--kb", kb_dir, "--threads", "0")
    assert code == 1 and "--threads >= 1" in err and "tiny random" not in err


def test_chat_answers_each_line_with_the_model_loaded_once(kb_dir):
    qs = [questions()[0]["question"], questions()[5]["question"]]
    proc = blockrag("chat", "--kb", kb_dir, "--k", "2", "--max-new-tokens", "3",
                    stdin=f"{qs[0]}\n\n   \n{qs[1]}\nexit\n{qs[0]}\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tiny random model") == 1  # loaded once for every question
    usage = [line for line in proc.stdout.splitlines() if line.startswith("usage: TTFT")]
    assert len(usage) == 2 and all("0 encoded now" in line for line in usage)  # nothing after 'exit'
    assert proc.stdout.count("sources:") == 2
    assert "observatory.md" in proc.stdout.split(usage[0])[0]  # the first answer's sources are the first question's


def test_a_json_template_is_accepted_and_recorded_so_later_runs_rebuild_it(tmp_path, capsys):
    template = tmp_path / "block_template.json"
    template.write_text(json.dumps({"name": "plain", "prefix": "Use the notes. {instruction}\n",
                                    "passage": "Note ({title}): {text}\n", "final": "Q: {question}\nA:",
                                    "instruction": "Be brief."}))
    code, out, err = run_cli(capsys, "ingest", CORPUS / "duck.txt", "--kb", tmp_path / "kb", "--model", "tiny-random",
                             "--template", template, "--no-progress", "--json")
    assert code == 0, err
    assert json.loads(out)["stats"]["model"]["template"] == str(template.resolve())
    # a later run without --template rebuilds the same template: the blocks are the stored ones
    code, out, err = run_cli(capsys, "ask", "What do ducks eat?", "--kb", tmp_path / "kb", "--k", "1",
                             "--max-new-tokens", "2", "--json")
    result = json.loads(out)
    assert code == 0 and result["usage"]["encoded_tokens"] == 0 and result["usage"]["cached_tokens"] > 0, err
    code, _, err = run_cli(capsys, "ask", "Why?", "--kb", tmp_path / "kb", "--template", tmp_path / "missing.json")
    assert code == 1 and "block_template.json file" in err
    template.unlink()
    code, _, err = run_cli(capsys, "ask", "Why?", "--kb", tmp_path / "kb")
    assert code == 1 and "pass --template" in err


def test_an_unknown_option_shows_the_usage_of_its_subcommand(capsys):
    for argv, usage, extra in ((["ask", "Why?", "--kb", "x", "--kk", "3"], "usage: blockrag ask ", "--kk 3"),
                               (["kb", "stats", "--kb", "x", "--verbose-ish"], "usage: blockrag kb stats ",
                                "--verbose-ish"),
                               (["ingest", "a.txt", "--kb", "x", "--overlap", "9"], "usage: blockrag ingest ",
                                "--overlap 9")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(usage), err
        assert f"unrecognized arguments: {extra}" in err


def test_make_bench_writes_to_a_scratch_folder_unless_asked(tmp_path):
    root = os.path.dirname(os.path.dirname(cli.__file__))
    dry = subprocess.run(["make", "-n", "bench"], cwd=root, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    command = [line for line in dry.stdout.splitlines() if "ttft.py" in line and "echo" not in line]
    assert command and command[0].endswith("--out /tmp/blockrag-bench"), dry.stdout
    assert "takes minutes" in dry.stdout
    asked = subprocess.run(["make", "-n", "bench", "BENCH_OUT=benchmarks/results"], cwd=root, capture_output=True,
                           text=True, timeout=60)
    assert any(line.endswith("--out benchmarks/results") for line in asked.stdout.splitlines())


def test_ask_recompute_recommended_reencodes_part_of_the_context(kb_dir, capsys):
    from blockrag.recompute import RECOMMENDED, Recompute

    assert Recompute.parse("recommended") == Recompute.parse(RECOMMENDED)
    q = questions()[0]["question"]
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "2", "--json",
                           "--recompute", "recommended")
    usage = json.loads(out)["usage"]
    context = usage["cached_tokens"] + usage["encoded_tokens"]
    assert code == 0 and 0 < usage["recomputed_tokens"] < context
    code, out, _ = run_cli(capsys, "ask", q, "--kb", kb_dir, "--k", "2", "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["usage"]["recomputed_tokens"] == 0  # control: plain block mode
    code, _, err = run_cli(capsys, "ask", q, "--kb", "/nonexistent", "--recompute", "everything")
    assert code == 1 and "'recommended'" in err and "'everything'" in err  # refused before the KB is opened
