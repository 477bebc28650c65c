"""The two doors between the engine and the stores, both protocols: the engine imports only these.

`ObjectStore`: the five object-store verbs the engine needs, all async. Methods map to requests;
nothing is cached behind the caller's back (the index does that, one level up). Each store
translates its transport's errors into the few names of `errors.py`, so the engine handles one
vocabulary whatever the transport.

`RangeReader`: range reads received on the reader's own threads, each checked and copied into its
targets there as it arrives (the native reader, `stores/native_reader.py`). The engine plans the
pieces (`RangePieces`); the reader moves the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
from typing_extensions import Buffer

from ..errors import AlreadyExists, NotFound, StoreError, Unavailable

__all__ = ["APPLIED", "CLOSED", "SHORT", "AlreadyExists", "Listed", "NotFound", "ObjectMeta", "ObjectStore", "RangePieces",
           "RangeReader", "RangeSource", "StoreError", "Unavailable"]


@dataclass(frozen=True)
class ObjectMeta:
    size: int  # bytes
    modified: float  # seconds since the epoch, by the server's clock (whole seconds on S3)


class Listed(NamedTuple):
    """One object of a listing."""

    path: str
    size: int  # bytes
    modified: float  # seconds since the epoch, by the server's clock


@runtime_checkable
class ObjectStore(Protocol):
    name: str

    async def get(self, path: str, *, start: int | None = None, end: int | None = None) -> Buffer:
        """Bytes [start, end) of an object (end exclusive), or all of it."""

    async def put(self, path: str, data: Buffer, *, create_only: bool = True) -> None:
        """Write a whole object atomically. create_only raises AlreadyExists if it is there."""

    async def head(self, path: str) -> ObjectMeta:
        """The object's size and last-modified time; NotFound if absent."""

    async def list(self, prefix: str, *, start_after: str | None = None) -> list[Listed]:
        """Every object under prefix, in lexical order, after start_after."""

    async def delete(self, paths: Sequence[str]) -> None:
        """Delete objects; absent ones are not an error."""

    async def close(self) -> None:
        """Release connections."""


APPLIED, CLOSED, SHORT = -1, -2, -3  # RangeSource.apply's outcomes besides a bad piece's index


@dataclass
class RangePieces:
    """What `RangeSource.apply` does with one range's bytes: piece i is [offsets[i], offsets[i] +
    piece_len) of the range (ascending), checked against expect[i] (None: not checked), then copied
    by copies[first[i]:first[i + 1]], each (dst address, offset in the range, length). The pieces
    are layer-major, `per_layer` a layer from layer `l0`: what `apply` counts as each layer lands."""

    offsets: np.ndarray  # uint64 [n]
    piece_len: int
    expect: np.ndarray | None  # uint64 [n]
    copies: np.ndarray  # uint64 [k, 3]
    first: np.ndarray  # int64 [n + 1]
    l0: int = 0
    per_layer: int = 1


class RangeSource(Protocol):
    """One range of one object, for the pull thread that reads it. `applies`: whether `apply` is
    offered (a transport that lands whole ranges only, such as NIXL, has just `filled`)."""

    applies: bool

    def filled(self) -> ContextManager[memoryview]:
        """Receive the whole range into a reused buffer: a view of exactly its bytes inside the
        block (for targets that need the whole range at once: promotion, function targets)."""

    def apply(self, pieces: RangePieces, gate, layers=None) -> int:
        """Receive the range piece by piece, never held whole: each piece is checked and copied to
        its targets inside `gate` (native.CopyGate); where `layers` (engine/readiness) is given,
        each layer counts as arrived once its pieces are in place. Returns APPLIED, SHORT (the
        object ends sooner: nothing copied), CLOSED (the gate closed first) or the index of the
        first piece that failed its check. Raises the store errors for transport failures."""


@runtime_checkable
class RangeReader(Protocol):
    def source(self, path: str, start: int, end: int) -> RangeSource:
        """Range [start, end) of object `path`, to be received on a pull thread."""

    def pull(self, job: Callable[[], None], dropped: Callable[[], None]) -> None:
        """Run `job` (one range read, received, checked and copied there) on one of the reader's
        threads; must not block. `dropped()` runs instead if the threads shut down first."""

    def close(self) -> None:
        """Stop the threads (jobs not started are dropped) and release connections."""
