"""An S3 store that follows its credentials: what keeps a server running through key rotations and
expiring tokens.

The transports take fixed keys. This wrapper builds one from the source's current credentials,
builds a new one when they change (the old one is closed a minute later, after the requests still
on it), and retries once a request the server refused for its credentials (403) after resolving the
chain again: a key rotated in a credentials file, or a token that expired between two checks.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from ..errors import AccessDenied
from .credentials import CredentialSource, Credentials

CLOSE_AFTER = 60.0  # seconds a replaced client lives on for the requests still on it


class RefreshingStore:
    def __init__(self, make: Callable[[Credentials], object], credentials: CredentialSource):
        self._make = make
        self.credentials = credentials
        self._version = credentials.version
        self._inner = make(credentials.current())
        self.name = self._inner.name
        self._retired: list = []

    async def open(self) -> None:
        if hasattr(self._inner, "open"):
            await self._inner.open()

    async def _swap(self) -> None:
        creds, version = self.credentials.current(), self.credentials.version
        if version == self._version:
            return
        new = self._make(creds)
        if hasattr(new, "open"):
            await new.open()
        old, self._inner, self._version = self._inner, new, version
        self._retired.append(old)
        asyncio.get_running_loop().call_later(CLOSE_AFTER, lambda: asyncio.ensure_future(self._retire(old)))

    async def _retire(self, old) -> None:
        if old in self._retired:
            self._retired.remove(old)
            await old.close()

    async def _call(self, verb: str, *args, **kw):
        self.credentials.current()  # notices a changed file or renews a token; cheap otherwise
        if self.credentials.version != self._version:
            await self._swap()
        used = self._version
        try:
            return await getattr(self._inner, verb)(*args, **kw)
        except AccessDenied:
            # retry once with other credentials: ones that changed while this call ran (another
            # call, or the file check, resolved them first), or what the chain gives now
            if self.credentials.version == used and not self.credentials.refresh():
                raise
            await self._swap()
            return await getattr(self._inner, verb)(*args, **kw)

    async def get(self, path: str, *, start: int | None = None, end: int | None = None):
        return await self._call("get", path, start=start, end=end)

    async def put(self, path: str, data, *, create_only: bool = True) -> None:
        return await self._call("put", path, data, create_only=create_only)

    async def head(self, path: str):
        return await self._call("head", path)

    async def list(self, prefix: str, *, start_after: str | None = None):
        return await self._call("list", prefix, start_after=start_after)

    async def delete(self, paths: Sequence[str]) -> None:
        return await self._call("delete", paths)

    async def close(self) -> None:
        for old in self._retired:
            await old.close()
        self._retired.clear()
        await self._inner.close()
