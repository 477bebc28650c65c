"""A local directory as an object store: one file per object, written atomically.

File I/O runs in worker threads so the event loop never stalls on a slow disk. Capacity is not
this class's business: the disk tier above it evicts least recently used objects.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Sequence

from ..errors import AlreadyExists, NotFound, StoreError
from .base import Listed, ObjectMeta


class DiskStore:
    def __init__(self, root: str):
        self.root = Path(root)
        self.name = f"disk:{root}"
        self.root.mkdir(parents=True, exist_ok=True)

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
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{id(data):x}.tmp")
            with open(tmp, "wb", buffering=0) as f:
                f.write(data)
            os.replace(tmp, p)
        except OSError as e:
            raise StoreError(f"PUT {path}: {e.strerror}") from None

    async def put(self, path: str, data, *, create_only: bool = True) -> None:
        await asyncio.to_thread(self._put, path, data, create_only)

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
                if fn.startswith("."):
                    continue  # temporary files of writes in flight
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
