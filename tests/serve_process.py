"""``blockrag serve`` as a real subprocess (for --workers and fault tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from serve_helpers import free_port


class ServeProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, log_path=None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "blockrag.cli", "serve", "--port", str(self.port), *args]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServeProcess:
        self.log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        # NOTE: own process group, so the supervisor and its workers are stopped together.
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"blockrag serve exited with {self.proc.returncode}: {self.read_log()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"blockrag serve did not become healthy in 120 s: {self.read_log()[-2000:]}")
            time.sleep(0.2)

    def read_log(self) -> str:
        if not self.log_path:
            return ""
        with open(self.log_path) as f:
            return f.read()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.log_path:
            self.log.close()

    def worker_pids(self) -> set[int]:
        """Pids of the worker processes (children of the supervisor)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}
