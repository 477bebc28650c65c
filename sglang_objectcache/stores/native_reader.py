"""The native range reader: `RangeReader` over plain HTTP, with its own pull threads and buffers.

Each range read runs start to end on one pull thread (`pull`): received by `rawhttp.py`'s native
code with one GIL release per range, checked and copied into the caller's targets there, piece by
piece as the bytes arrive (`RangeSource.apply`), or whole into a reused staging buffer first where
the caller needs the whole range (`RangeSource.filled`). Only the read's end goes back to the
engine's loop.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
from dataclasses import dataclass
from typing import Callable

from ..buffer_pool import BufferPool
from .base import RangePieces
from .rawhttp import RawRangeReader


class StagingBuffers(BufferPool):
    """Receive buffers for whole ranges: at most `keep` are held between reads (about
    max_connections x read_range_bytes)."""

    @contextlib.contextmanager
    def filled(self, reader: RawRangeReader, key: str, start: int, end: int):
        """A view of exactly the range's bytes, valid inside the block."""
        n = end - start
        buf = self.take(n)
        try:
            yield memoryview(buf[: reader.read_into(key, start, end, buf[:n])])
        finally:
            self.give(buf)


@dataclass
class HttpRangeSource:
    """One range of one object, received by `http` (a `RangeSource`)."""

    http: RawRangeReader
    staging: StagingBuffers
    key: str
    start: int
    end: int

    @property
    def applies(self) -> bool:
        return hasattr(self.http, "read_pieces")  # NIXL lands whole ranges only

    def filled(self):
        return self.staging.filled(self.http, self.key, self.start, self.end)

    def apply(self, pieces: RangePieces, gate, layers=None) -> int:
        return self.http.read_pieces(self.key, self.start, self.end, pieces, gate, layers)


class NativeRangeReader:
    """A `RangeReader`: `threads` pull threads (one per connection) and their staging buffers."""

    def __init__(self, http: RawRangeReader, *, threads: int, staging_bytes: int):
        self.http = http
        self.staging = StagingBuffers(threads, staging_bytes)
        self._pullers = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="objectcache-pull")

    def source(self, path: str, start: int, end: int) -> HttpRangeSource:
        return HttpRangeSource(self.http, self.staging, path, start, end)

    def pull(self, job: Callable[[], None], dropped: Callable[[], None]) -> None:
        try:
            fut = self._pullers.submit(job)
        except RuntimeError:  # shut down: the engine is closing
            dropped()
            return
        fut.add_done_callback(lambda f: dropped() if f.cancelled() else None)

    def close(self) -> None:
        self._pullers.shutdown(wait=False, cancel_futures=True)
        self.http.close()
