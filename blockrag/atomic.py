"""Atomic file writes: temp file in a sibling directory, write, fsync, rename, fsync the directory.

A reader either sees the old file (or none) or the complete new one; a crash at any point leaves at most
a temp file, which carries the writer's pid in its name so a later writer can tell it is stale.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from blockrag.errors import StoreWriteError

TEMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20


def temp_name(final_name: str) -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}-{final_name}"


def temp_owner_pid(name: str) -> int | None:
    """Pid of the process that created temp file ``name`` (None if the name is not a temp name)."""
    if not name.startswith(TEMP_PREFIX):
        return None
    pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:written + _CHUNK])


def atomic_write(path: str | os.PathLike, data: bytes | bytearray | memoryview, tmp_dir: str | os.PathLike | None = None
                 ) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file.

    Args:
        path: final location; its directory must exist.
        data: the complete file content.
        tmp_dir: where the temp file is made (same filesystem as path); default: path's directory.

    Raises:
        StoreWriteError: the write failed (ENOSPC, EIO, ...); the temp file has been removed.
    """
    path = Path(path)
    tmp_dir = Path(tmp_dir) if tmp_dir is not None else path.parent
    tmp = tmp_dir / temp_name(path.name)
    view = memoryview(data).cast("B")
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(fd, view)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise StoreWriteError(
            e.errno or errno.EIO,
            f"expected to write {len(view)} bytes to {path}, found the write failing: {reason}; "
            "nothing partial was left behind, free space (or fix the error) and re-run",
        ) from e
    fsync_dir(path.parent)
    if tmp_dir != path.parent:
        fsync_dir(tmp_dir)
