"""Connection slots with two priorities: a waiting read always goes before a waiting write.

Backup writes must never delay prefetch reads. Writes also have their own, lower ceiling so a
burst of spills cannot occupy every connection when reads arrive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib


class PrioritySlots:
    def __init__(self, total: int, max_writes: int):
        self.total = total
        self.max_writes = max(1, min(max_writes, total))
        self.active = 0
        self.active_writes = 0
        self._reads: collections.deque[asyncio.Future] = collections.deque()
        self._writes: collections.deque[asyncio.Future] = collections.deque()

    def _grant(self) -> None:
        while self.active < self.total:
            if self._reads:
                fut = self._reads.popleft()
                if fut.done():
                    continue
                self.active += 1
                fut.set_result(False)
            elif self._writes and self.active_writes < self.max_writes:
                fut = self._writes.popleft()
                if fut.done():
                    continue
                self.active += 1
                self.active_writes += 1
                fut.set_result(True)
            else:
                return

    @contextlib.asynccontextmanager
    async def acquire(self, *, write: bool = False):
        fut = asyncio.get_running_loop().create_future()
        (self._writes if write else self._reads).append(fut)
        self._grant()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(write)  # granted just as we were cancelled
            raise
        try:
            yield
        finally:
            self._release(write)

    def _release(self, write: bool) -> None:
        self.active -= 1
        if write:
            self.active_writes -= 1
        self._grant()
