"""Every example runs end to end with a tiny local model (offline), so they cannot rot.

The scripts' `main(argv)` runs in this process (imports are shared, so this stays fast); one script
also runs as a real subprocess, the way the README tells users to run them.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--model", "tiny-random", "--max-tokens", "6", "--k", "3"]


@pytest.fixture(autouse=True)
def _offline():
    from pytest_socket import disable_socket, enable_socket

    disable_socket(allow_unix_socket=True)
    yield
    enable_socket()


def _run(name: str, argv: list[str], monkeypatch, capsys, stdin: str | None = None) -> str:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    spec = importlib.util.spec_from_file_location(f"blockrag_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    return capsys.readouterr().out


def _check_common(out: str, answers: int) -> None:
    assert "tiny random model" in out and "answers are noise" in out
    assert "[kb] created" in out
    assert len(re.findall(r"^  \[1\] ", out, flags=re.M)) == answers  # sources listed per answer
    assert len(re.findall(r"^  \[3\] ", out, flags=re.M)) == answers


def test_quickstart(monkeypatch, capsys, tmp_path):
    out = _run("quickstart", [*TINY, "--kb", str(tmp_path / "kb"), "--recompute", "recommended"], monkeypatch, capsys)
    _check_common(out, answers=4)
    assert "[kb] 30 documents" in out
    # ingest stored every passage block: block mode encodes nothing at question time
    assert len(re.findall(r"block mode: +TTFT [\d.]+ ms \| context: [1-9]\d* tokens from cached blocks, "
                          r"0 encoded now \|", out)) == 4
    # recovery re-encodes part of the cached context: more than the plain block mode prefills, less than full
    recovered = re.findall(r"block \+ recovery: +TTFT [\d.]+ ms \| context: ([1-9]\d*) tokens from cached blocks, "
                           r"0 encoded now, ([1-9]\d*) recomputed", out)
    assert len(recovered) == 4 and all(int(r) < int(c) for c, r in recovered)
    assert len(re.findall(r"full mode: +TTFT [\d.]+ ms \| context: 0 tokens from cached blocks, 0 encoded now \| "
                          r"[1-9]\d* prefilled", out)) == 4
    assert len(re.findall(r"TTFT: block mode \d+ ms \([\d.]+x\), block \+ recovery \d+ ms \([\d.]+x\) "
                          r"vs full \d+ ms", out)) == 4
    # without --recompute (what make demo runs): block and full mode side by side, no recovery column
    plain = _run("quickstart", [*TINY, "--kb", str(tmp_path / "kb")], monkeypatch, capsys)
    assert "recovery" not in plain and "[kb] opened" in plain
    assert len(re.findall(r"^  block mode: ", plain, flags=re.M)) == 8  # answer + usage line per question
    assert len(re.findall(r"TTFT: block mode \d+ ms \([\d.]+x\) vs full \d+ ms", plain)) == 4


def test_the_examples_default_to_the_shipped_block_ready_model(monkeypatch):
    from blockrag.models import BLOCK_READY_MODEL, resolve

    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("blockrag_example_common", EXAMPLES / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert common.DEFAULT_MODEL == BLOCK_READY_MODEL
    assert common.parser("x").parse_args([]).model == BLOCK_READY_MODEL
    assert resolve(BLOCK_READY_MODEL).named.base == "smollm2-135m"  # the base model stays one flag away




def test_langchain_qa(monkeypatch, capsys):
    out = _run("langchain_qa", [*TINY, "--question", "How much is a family ticket?"], monkeypatch, capsys)
    _check_common(out, answers=1)
    assert "Q: How much is a family ticket?" in out
    assert "Fares and tickets" in out  # the real embedder finds the right document
    (read, total), = re.findall(r"(\d+) of (\d+) prompt tokens read from cached blocks", out)
    assert 0 < int(read) < int(total)


def test_llamaindex_qa(monkeypatch, capsys):
    out = _run("llamaindex_qa", [*TINY, "--question", "Where are the engines overhauled?"], monkeypatch, capsys)
    _check_common(out, answers=1)
    assert "Harrowgill works and boiler overhauls" in out
    (cached, total), = re.findall(r"(\d+) of (\d+) prompt tokens from cached blocks", out)
    assert 0 < int(cached) < int(total)


def test_qa_app_reopens_its_knowledge_base(monkeypatch, capsys, tmp_path):
    kb = ["--kb", str(tmp_path / "kb")]
    out = _run("qa_app", [*TINY, *kb], monkeypatch, capsys, stdin="How long is Skelwith Tunnel?\n\n")
    _check_common(out, answers=1)
    assert "Skelwith Tunnel (14-skelwith-tunnel.md" in out
    assert re.search(r"TTFT [\d.]+ ms \| context: [1-9]\d* tokens from cached blocks, 0 encoded now", out)
    # a second session opens the same knowledge base; its blocks come from disk; Ctrl-D (EOF) leaves
    again = _run("qa_app", [*TINY, *kb], monkeypatch, capsys, stdin="How much is a family ticket?\nWho is Ellen?\n")
    assert "[kb] opened" in again and "[kb] created" not in again
    assert len(re.findall(r"0 encoded now", again)) == 2


def test_qa_app_as_a_script(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "qa_app.py"), "--model", "tiny-random",
                           "--max-tokens", "4", "--kb", str(tmp_path / "kb")],
                          input="How much is a family ticket?\nquit\n", capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Fares and tickets" in done.stdout and "TTFT" in done.stdout


def test_an_unknown_model_offline_is_an_error_not_a_fallback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "qa_app.py"), "--model", "no-such-org/no-such-model",
                           "--kb", str(tmp_path / "kb")], input="quit\n", capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1
    assert "'no-such-org/no-such-model' is not in the local Hugging Face cache" in done.stderr
    assert "smollm2-135m" in done.stderr  # says what works offline
    assert "tiny random" not in done.stdout and not (tmp_path / "kb").exists()


def test_world_state(monkeypatch, capsys):
    """Lore and character states are cached blocks: a new situation encodes nothing, a changed state only its
    own block."""
    out = _run("world_state", ["--model", "tiny-random", "--max-tokens", "4"], monkeypatch, capsys)
    encoded = [int(n) for n in re.findall(r"(\d+) encoded now", out)]
    cached = [int(n) for n in re.findall(r"(\d+) tokens from cached blocks", out)]
    assert len(encoded) == 3 and encoded[0] > 0 and cached[0] == 0
    assert encoded[1] == 0 and cached[1] == encoded[0]  # same lore and states: all from the store
    assert 0 < encoded[2] < encoded[0]  # only Tobin's block again
    assert cached[2] + encoded[2] > cached[1]  # his block grew


def test_finetune_takes_model_and_kb(monkeypatch, capsys, tmp_path):
    """`blockrag finetune --model` on the sample records, then the fine-tuned model creates `--kb` and answers
    from its cached blocks in block mode."""
    from blockrag.index import KnowledgeBase

    workdir, kb = tmp_path / "work", tmp_path / "kb"
    out = _run("finetune", [*TINY, "--kb", str(kb), "--workdir", str(workdir), "--steps", "4"], monkeypatch, capsys)
    _check_common(out, answers=4)
    assert "[finetune] blockrag finetune --model tiny-random" in out
    (losses,) = re.findall(r"\[finetune\] losses: \[(.*)\]", out)
    assert len(losses.split(",")) == 2  # --steps 4, a loss logged every 2 steps
    assert (workdir / "train.jsonl").is_file() and (workdir / "block-ready" / "block_template.json").is_file()
    assert KnowledgeBase.info(kb)["model"]["name"] == str(workdir / "block-ready")  # built by the fine-tuned model
    assert len(re.findall(r"block mode: TTFT [\d.]+ ms \| context: [1-9]\d* tokens from cached blocks, 0 encoded now",
                          out)) == 4
