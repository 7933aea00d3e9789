"""SIGKILL an ingest process at random points: the knowledge base stays consistent and a re-run completes.

Each trial ingests the test corpus into a fresh knowledge base in a separate process (forked from a server
that has the heavy modules imported, so a trial costs about a second) and kills it with SIGKILL: half of
the trials after a random delay, half at a random os.fsync of the atomic writes (just before or after it),
which lands kills between writing a temp file, renaming it, syncing its directory and committing. After
each kill the on-disk state is checked before anything repairs it, then the ingest is re-run to the end.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kb_helpers import CORPUS, embedder, torch_threads

from blockrag import atomic as atomic_module
from blockrag.index import KnowledgeBase
from blockrag.store.disk import decode_block

WORKER = Path(__file__).parent / "kb_crash_worker.py"
KILLS = 12
BATCH_TOKENS = 160
CHUNK = dict(chunk_tokens=64, chunk_overlap=8)



@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield

class ForkServer:
    def __init__(self, log: Path) -> None:
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1, env=env)
        # NOTE: a reader thread, not select(): select cannot see lines already in the pipe's read buffer.
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.readline(120) == "ready"

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("")

    def readline(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"fork server silent for {timeout} s; see its log") from None
        if not line:
            raise RuntimeError("fork server exited; see its log")
        return line

    def send(self, command: dict) -> int:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        kind, pid = self.readline(60).split()
        assert kind == "child"
        return int(pid)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_engine):
    """A complete, uninterrupted ingest: its passages and how many fsyncs it makes."""
    path = tmp_path_factory.mktemp("reference") / "kb"
    calls = [0]
    real_fsync = os.fsync

    def counting(fd):
        calls[0] += 1
        real_fsync(fd)

    with KnowledgeBase.create(path, make_engine("llama"), embedder(), **CHUNK) as kb:
        atomic_module.os.fsync = counting
        try:
            kb.add_paths([CORPUS], batch_tokens=BATCH_TOKENS)
        finally:
            atomic_module.os.fsync = real_fsync
        passages = {(row["vec_id"], row["block_key"]) for row in kb.docstore.iter_passages()}
        stats = kb.stats()
    assert stats["documents"] == 11 and calls[0] > 20
    return {"keys": {key for _, key in passages}, "passages": stats["passages"], "fsyncs": calls[0]}


def check_after_kill(path: Path) -> dict:
    """What a crash may leave, checked on the raw files before any writer touches them."""
    db = sqlite3.connect(path / "docstore.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Transactions are whole: every committed document has all of its passages.
    for doc_id, expected in db.execute("SELECT id, num_passages FROM documents"):
        assert db.execute("SELECT COUNT(*) FROM passages WHERE doc_id = ?", (doc_id,)).fetchone()[0] == expected
    db.close()
    with KnowledgeBase.open(path) as kb:  # no engine: opening writes nothing
        report = kb.verify(deep=True)
        assert report["missing_blocks"] == [], "a passage points at a missing KV file"
        assert report["corrupt_blocks"] == [], "a passage points at a partial or damaged KV file"
        assert report["index_extra"] == 0, "the saved index holds a vector the docstore does not know"
        for key in report["orphan_blocks"]:  # unreferenced files are reported, and complete
            decode_block(kb.kv.path_of(key).read_bytes(), key=key)
        for temp in report["temp_files"]:  # partial writes only ever live under a temp name
            assert Path(temp).name.startswith(".tmp-")
        if report["passages"]:
            hits = kb.search("What colour are the feathers of the duck?", 3)
            assert hits and all(kb.docstore.passage(h.passage_id) is not None for h in hits)
        assert kb.stats()["orphan_blocks"] == len(report["orphan_blocks"])
    return report


def calibrate(server: ForkServer, path: Path, make_engine) -> float:
    """Seconds an uninterrupted ingest takes in a forked process (time-based kills are drawn below it)."""
    KnowledgeBase.create(path, make_engine("llama"), embedder(), **CHUNK).close()
    pid = server.send({"kb": str(path), "docs": str(CORPUS), "batch_tokens": BATCH_TOKENS, "kill_at_fsync": None})
    assert server.readline(120) == f"started {pid}"
    kind, _, seconds = server.readline(120).split()
    assert kind == "finished" and server.readline(60) == f"exit {pid} 0"
    return float(seconds)


@pytest.mark.slow  # over a minute on 2 cores: SIGKILLs a real ingest at several points
def test_sigkill_during_ingest_leaves_a_consistent_kb_and_a_rerun_completes(tmp_path, reference, make_engine):
    server = ForkServer(tmp_path / "server.log")
    rng = random.Random(1234)
    seconds = calibrate(server, tmp_path / "calibration", make_engine)
    kills = trials = 0
    seen = {"orphans": 0, "temps": 0, "partial_docs": 0}
    try:
        while kills < KILLS:
            trials += 1
            assert trials <= 2 * KILLS, f"only {kills} of {trials} trials were killed mid-ingest"
            path = tmp_path / f"kb{trials}"
            KnowledgeBase.create(path, make_engine("llama"), embedder(), **CHUNK).close()
            by_fsync = trials % 2 == 0
            command = {"kb": str(path), "docs": str(CORPUS), "batch_tokens": BATCH_TOKENS,
                       "kill_at_fsync": rng.randint(1, reference["fsyncs"]) if by_fsync else None}
            pid = server.send(command)
            started = server.readline(120)
            assert started == f"started {pid}", started
            if not by_fsync:
                time.sleep(rng.uniform(0.0, seconds))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kind, _, code = server.readline(120).split()
            if kind == "finished":
                kind, _, code = server.readline(60).split()
            assert kind == "exit"
            if int(code) == 0:
                continue  # finished before the kill point: not a crash trial
            assert int(code) == -signal.SIGKILL, f"ingest failed by itself (exit {code}); see {tmp_path}/server.log"
            kills += 1
            report = check_after_kill(path)
            seen["orphans"] += bool(report["orphan_blocks"])
            seen["temps"] += bool(report["temp_files"])
            seen["partial_docs"] += 0 < report["passages"] < reference["passages"]
            # The re-run (here, in this process) completes and adopts what the killed run left.
            with KnowledgeBase.open(path, make_engine("llama"), embedder()) as kb:
                kb.add_paths([CORPUS], batch_tokens=BATCH_TOKENS)
                final = kb.verify(deep=True)
                assert final["ok"] and final["orphan_blocks"] == [] and final["temp_files"] == []
                assert final["index_missing"] == 0 and final["index_extra"] == 0
                assert kb.stats()["passages"] == reference["passages"]
                assert kb.docstore.referenced_keys() == reference["keys"]
    finally:
        server.close()
    print(f"\n{kills} SIGKILLs in {trials} trials (uninterrupted ingest {seconds:.2f} s); left orphan KV files "
          f"{seen['orphans']}x, temp files {seen['temps']}x, a partly ingested corpus {seen['partial_docs']}x")
    assert seen["partial_docs"] >= 3  # kills really landed in the middle of ingests
