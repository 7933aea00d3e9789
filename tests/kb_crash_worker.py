"""Fork server for the SIGKILL tests: imports the heavy modules once, then forks one ingest process per command.

Protocol (one line each, on stdin / stdout):
    -> {"kb": DIR, "docs": DIR, "kill_at_fsync": N or null, "batch_tokens": N}
    <- child PID            (the ingest process exists)
    <- started PID          (written by the child once its models are loaded and the ingest begins)
    <- finished PID SECONDS (written by the child if its ingest completes)
    <- exit PID CODE        (CODE: exit status, or -SIGNAL when killed)
With kill_at_fsync, the child sends itself SIGKILL on its N-th os.fsync (half the time just before it, half
just after); otherwise the test kills it from outside after a random delay.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# NOTE: one thread per process: the tiny models gain nothing from more, and OpenMP spin-waiting makes
# oversubscribed cores (several test processes at once) many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402,F401 - imported before forking, used by the children
import sentence_transformers  # noqa: E402,F401
import torch  # noqa: E402

import blockrag.index  # noqa: E402,F401
import blockrag.testing  # noqa: E402,F401


def ingest(command: dict) -> None:
    from blockrag import BlockEngine
    from blockrag.index import Embedder, KnowledgeBase
    from blockrag.testing import tiny_pipeline

    torch.set_num_threads(1)
    engine = BlockEngine(*tiny_pipeline("llama", seed=0))
    embedder = Embedder()
    limit = command.get("kill_at_fsync")
    if limit is not None:
        real_fsync, calls = os.fsync, [0]
        before = random.Random(limit).random() < 0.5

        def fsync(fd):
            calls[0] += 1
            if calls[0] == limit and before:
                os.kill(os.getpid(), signal.SIGKILL)
            real_fsync(fd)
            if calls[0] == limit:
                os.kill(os.getpid(), signal.SIGKILL)

        os.fsync = fsync
    with KnowledgeBase.open(command["kb"], engine, embedder) as kb:
        print(f"started {os.getpid()}", flush=True)
        report = kb.add_paths([command["docs"]], batch_tokens=command.get("batch_tokens"), progress=False)
    print(f"finished {os.getpid()} {report.seconds:.4f}", flush=True)


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ingest(command)
            except BaseException as e:  # noqa: B036 - report anything, never return into the parent's loop
                print(f"error {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        print(f"child {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {pid} {code}", flush=True)


if __name__ == "__main__":
    main()
