"""The writer lock: one writing process per knowledge base (flock), one writing thread per process.

Readers never take it: SQLite (WAL) and the atomically renamed KV and index files keep them consistent.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from blockrag.index.errors import KnowledgeBaseLockedError


class WriterLock:
    """Re-entrant within this process; ``on_acquire`` runs each time the cross-process lock is taken.

    Args:
        path: the lock file (created if missing).
        timeout: seconds to wait for another process to finish writing.
        on_acquire: e.g. remove temp files of dead writers (safe only while holding the lock).
    """

    def __init__(self, path: Path, timeout: float, on_acquire: Callable[[], object] = lambda: None) -> None:
        self.path = path
        self.timeout = timeout
        self.on_acquire = on_acquire
        self._thread_lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._acquire(fd)
                self._depth = 1
                try:
                    self.on_acquire()
                    yield
                finally:
                    self._depth = 0
            finally:
                os.close(fd)  # releases the flock

    def _acquire(self, fd: int) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KnowledgeBaseLockedError(
                        f"expected to get the writer lock of {self.path.parent} within {self.timeout:.0f} s, "
                        "found another process writing to it; wait for it to finish") from None
                time.sleep(0.05)
