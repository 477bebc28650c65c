"""One byte budget for a local directory, shared by every process that writes into it.

Several TP ranks, or several servers on one host, may point their disk tier at one directory (MLA
ranks share objects by design). The budget is the directory's, not a process's: each write takes
an exclusive `flock` on `<dir>/.objectcache.lock`, measures what the directory holds (objects and
writes in flight, from the file system itself), evicts the least recently used objects (file
modification time: a read touches its object, `DiskStore.touch`) until the new object fits, and
creates the new object's temporary file at its full size before it lets go, so that a concurrent
writer counts it. A process whose object was evicted by another learns it when a read finds the
file gone (a miss; the index heals).

Temporary files are `.<name>.<pid>.<n>.tmp`: one whose process is gone, or older than an hour, is
left over from a crash or a full disk, and is deleted at the next scan.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

LOCK_NAME = ".objectcache.lock"
STALE_TMP = 3600.0  # seconds after which a temporary file is left over, whoever wrote it


def _pid_alive(pid: int) -> bool:
    """The process runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the name in parentheses may hold spaces
        return state not in (b"Z", b"X")
    except (OSError, IndexError):  # no /proc (not Linux): what kill said
        return True


def tmp_pid(filename: str) -> int | None:
    """The writer's pid of a temporary file name; None for another name."""
    if not (filename.startswith(".") and filename.endswith(".tmp")):
        return None
    parts = filename[:-4].split(".")
    try:
        return int(parts[-2])
    except (IndexError, ValueError):
        return None


class DirectoryBudget:
    def __init__(self, root: Path, capacity: int, on_evict: Callable[[str], None] | None = None):
        self.root = root
        self.capacity = capacity
        self.on_evict = on_evict  # (name relative to the root) for every object this process evicts
        self.used = 0  # bytes at the last scan
        self.swept = 0  # left-over temporary files deleted so far
        self.pinned: set[str] = set()  # names this process must not evict (copies still owed below)

    @contextmanager
    def locked(self):
        fd = os.open(self.root / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _scan(self) -> tuple[int, list[tuple[float, str, int]]]:
        """Under the lock: bytes held (objects and live temporary files) and the objects as
        (mtime, name, size); left-over temporary files are deleted on the way."""
        total, objects, now = 0, [], time.time()
        for dirpath, _dirs, files in os.walk(self.root):
            for fn in files:
                if fn == LOCK_NAME:
                    continue
                full = Path(dirpath) / fn
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                if fn.startswith("."):
                    pid = tmp_pid(fn)
                    if pid is not None and (not _pid_alive(pid) or now - st.st_mtime > STALE_TMP):
                        try:
                            full.unlink()
                            self.swept += 1
                        except FileNotFoundError:
                            pass
                        continue
                    total += st.st_size
                    continue
                total += st.st_size
                objects.append((st.st_mtime, full.relative_to(self.root).as_posix(), st.st_size))
        return total, objects

    def make_room(self, size: int) -> list[str]:
        """Under the lock: evict least recently used objects until `size` more bytes fit; the
        names evicted."""
        total, objects = self._scan()
        evicted = []
        if total + size > self.capacity:
            for _mtime, name, osize in sorted(objects):
                if total + size <= self.capacity:
                    break
                if name in self.pinned:
                    continue
                try:
                    (self.root / name).unlink()
                except FileNotFoundError:
                    pass
                total -= osize
                evicted.append(name)
        if total + size > self.capacity:
            raise OSError(28, "no room: the rest is owed to the tier below (write-back)")
        self.used = total + size
        if self.on_evict is not None:
            for name in evicted:
                self.on_evict(name)
        return evicted

    def check(self) -> int:
        """Sweep and enforce the budget now (at start: the capacity may have shrunk); bytes held."""
        with self.locked():
            try:
                self.make_room(0)
            except OSError:  # over the budget with nothing it may evict: writes will wait or fail
                pass
        return self.used
