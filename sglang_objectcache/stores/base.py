"""The store protocol: the five object-store verbs the engine needs, all async.

Methods map to requests; nothing is cached behind the caller's back (the index does that, one
level up). Errors are translated into the few names below in each store, so the engine handles
one vocabulary whatever the transport.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from typing_extensions import Buffer


class StoreError(Exception):
    """A request failed. Messages never carry credentials."""


class NotFound(StoreError, FileNotFoundError):
    """The object does not exist."""


class AlreadyExists(StoreError):
    """A create-only put found the object already there."""


class Unavailable(StoreError):
    """The server could not be reached, or timed out."""


@runtime_checkable
class ObjectStore(Protocol):
    name: str

    async def get(self, path: str, *, start: int | None = None, end: int | None = None) -> Buffer:
        """Bytes [start, end) of an object (end exclusive), or all of it."""

    async def put(self, path: str, data: Buffer, *, create_only: bool = True) -> None:
        """Write a whole object atomically. create_only raises AlreadyExists if it is there."""

    async def head(self, path: str) -> int:
        """The object's size in bytes; NotFound if absent."""

    async def list(self, prefix: str, *, start_after: str | None = None) -> list[tuple[str, int]]:
        """(path, size) of every object under prefix, in lexical order, after start_after."""

    async def delete(self, paths: Sequence[str]) -> None:
        """Delete objects; absent ones are not an error."""

    async def close(self) -> None:
        """Release connections."""
