"""Re-export of atomic file writes, which live in the leaf module ``blockrag.atomic`` (store, index, trainer)."""

from blockrag.atomic import TEMP_PREFIX, atomic_write, fsync_dir, pid_alive, temp_name, temp_owner_pid

__all__ = ["TEMP_PREFIX", "atomic_write", "fsync_dir", "pid_alive", "temp_name", "temp_owner_pid"]
