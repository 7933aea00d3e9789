"""A real redis-server for tests: the one .ci/run started (BLOCKRAG_TEST_REDIS_URL), or a private one.

Tests skip only where no redis-server binary exists, and never in CI (CI=true): there a missing binary fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from serve_helpers import free_port

URL_ENV = "BLOCKRAG_TEST_REDIS_URL"


def redis_binary() -> str:
    path = shutil.which("redis-server") or shutil.which("valkey-server")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("expected redis-server in CI (.ci/run installs Debian's redis-server), found none")
        pytest.skip("no redis-server binary on this machine (apt-get install redis-server)")
    return path


class RedisProcess:
    """redis-server on 127.0.0.1:<port>, no persistence; start / kill / restart on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = redis_binary()
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def shared_redis_url():
    """Yields a URL of a running Redis (for a session fixture)."""
    url = os.environ.get(URL_ENV)
    if url:
        yield url
        return
    with RedisProcess() as server:
        yield server.url
