"""A local directory as an object store: one file per object, written atomically.

File I/O runs in worker threads so the event loop never stalls on a slow disk. With a budget
(`disk_budget.DirectoryBudget`, the disk tier gives one), each write first makes room in the
directory and books its bytes there, under a lock that every process sharing the directory takes.
A write goes to a temporary file, is flushed to disk (fsync) and then renamed into place, so that
after a crash or power loss a name holds either a whole object or nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Sequence

from ..errors import AlreadyExists, NotFound, StoreError
from .base import Listed, ObjectMeta
from .disk_budget import LOCK_NAME, DirectoryBudget


class DiskStore:
    def __init__(self, root: str, budget_bytes: int | None = None):
        self.root = Path(root)
        self.name = f"disk:{root}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = DirectoryBudget(self.root, budget_bytes) if budget_bytes else None
        self._n = itertools.count()

    def _path(self, path: str) -> Path:
        p = (self.root / path).resolve()
        if self.root.resolve() not in p.parents:
            raise StoreError(f"path escapes the store root: {path}")
        return p

    def _get(self, path: str, start: int | None, end: int | None) -> bytes:
        try:
            with open(self._path(path), "rb", buffering=0) as f:
                if start is None and end is None:
                    return f.read()
                size = os.fstat(f.fileno()).st_size
                s = start or 0
                e = size if end is None else min(end, size)
                return os.pread(f.fileno(), max(0, e - s), s)
        except FileNotFoundError:
            raise NotFound(f"GET {path}") from None
        except OSError as e:
            raise StoreError(f"GET {path}: {e.strerror}") from None

    async def get(self, path: str, *, start: int | None = None, end: int | None = None):
        return await asyncio.to_thread(self._get, path, start, end)

    def _put(self, path: str, data, create_only: bool) -> None:
        p = self._path(path)
        if create_only and p.exists():
            raise AlreadyExists(f"PUT {path}")
        size = memoryview(data).nbytes
        if self.budget is not None and size > self.budget.capacity:
            raise StoreError(f"PUT {path}: {size} bytes exceed the directory's capacity")
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{next(self._n)}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = None
            if self.budget is not None:
                with self.budget.locked():  # room made and booked before another writer looks
                    self.budget.make_room(size)
                    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                    os.ftruncate(fd, size)
            else:
                fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            with open(fd, "wb", buffering=0, closefd=True) as f:
                view, done = memoryview(data).cast("B"), 0
                while done < size:
                    done += f.write(view[done:])
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise StoreError(f"PUT {path}: {e.strerror}") from None

    async def put(self, path: str, data, *, create_only: bool = True) -> None:
        await asyncio.to_thread(self._put, path, data, create_only)

    def touch(self, path: str) -> None:
        """Mark the object used now (its modification time orders eviction); gone is fine."""
        try:
            os.utime(self._path(path))
        except (FileNotFoundError, StoreError):
            pass

    async def head(self, path: str) -> ObjectMeta:
        try:
            st = await asyncio.to_thread(os.stat, self._path(path))
            return ObjectMeta(st.st_size, st.st_mtime)
        except FileNotFoundError:
            raise NotFound(f"HEAD {path}") from None

    def _list(self, prefix: str, start_after: str | None) -> list[Listed]:
        out = []
        base = self.root
        for dirpath, _dirs, files in os.walk(base):
            for fn in files:
                if fn.startswith(".") or fn == LOCK_NAME:
                    continue  # temporary files of writes in flight, the budget's lock
                full = Path(dirpath) / fn
                rel = full.relative_to(base).as_posix()
                if rel.startswith(prefix) and (start_after is None or rel > start_after):
                    try:
                        st = full.stat()
                        out.append(Listed(rel, st.st_size, st.st_mtime))
                    except FileNotFoundError:
                        pass
        return sorted(out)

    async def list(self, prefix: str, *, start_after: str | None = None) -> list[Listed]:
        return await asyncio.to_thread(self._list, prefix, start_after)

    def _delete(self, paths: Sequence[str]) -> None:
        for path in paths:
            try:
                self._path(path).unlink()
            except FileNotFoundError:
                pass

    async def delete(self, paths: Sequence[str]) -> None:
        await asyncio.to_thread(self._delete, paths)

    async def close(self) -> None:
        return None
