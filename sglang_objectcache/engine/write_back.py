"""Write-back: copies of objects from the first tier (disk) to the tiers below (S3), bounded,
retried, and drained at shutdown.

A page counts as stored once the first tier holds it; its copy below is owed from then on:

- Memory: the encoded bytes of queued copies are held up to `write_back_buffer`; past it, a copy
  re-reads its object from the first tier at its turn.
- Backlog: at most `MAX_QUEUED` copies wait; a put that would queue more waits for room (up to its
  deadline, then its pages are not stored): SGLang's backup thread slows down instead of memory
  growing.
- Failures: a copy that fails is retried with backoff (1 s doubling to 60 s) for as long as the
  first tier holds the object. The first tier never evicts an object whose copy is owed (`pin`).
- Shutdown: `drain` gives the queue `shutdown_timeout`; what is left is counted and logged, and
  stays in the first tier. At the next start, objects of the first tier that the last one lacks are
  queued again (`resume`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from ..errors import CorruptObject, NameTaken, NotFound, StoreError
from ..format import decode_header
from .index import ObjectInfo

log = logging.getLogger("sglang_objectcache")

MAX_QUEUED = 4096  # copies owed at once (queued or waiting to retry)
WORKERS = 4  # copies in flight at once
BACKOFF = (1.0, 60.0)  # first and longest wait before a retry, seconds


@dataclass
class _Copy:
    info: ObjectInfo
    data: object | None  # the encoded object, or None: re-read it from the first tier
    attempts: int = 0


class WriteBack:
    def __init__(self, tiers: list, buffer_bytes: int, stats):
        self.tiers = tiers
        self.buffer_bytes = buffer_bytes
        self.stats = stats
        self.held = 0  # bytes of queued copies held in memory
        self.owed = 0  # copies queued, in flight or waiting to retry
        self._queue: collections.deque[_Copy] = collections.deque()
        self._ready = asyncio.Event()  # something queued
        self._room = asyncio.Event()  # fewer than MAX_QUEUED owed
        self._room.set()
        self._idle = asyncio.Event()  # nothing owed
        self._idle.set()
        self._workers: list[asyncio.Task] = []
        self._backoff: dict[asyncio.TimerHandle, _Copy] = {}  # copies waiting to be retried

    @property
    def first(self):
        return self.tiers[0]

    def start(self) -> None:
        """On the loop."""
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]

    async def wait_for_room(self) -> None:
        """Before a write that will owe a copy: backpressure once MAX_QUEUED are owed."""
        while self.owed >= MAX_QUEUED:
            self._room.clear()
            await self._room.wait()

    def submit(self, info: ObjectInfo, data) -> None:
        """The first tier holds `info`: owe its copy below. On the loop."""
        keep = data is not None and self.held + len(data) <= self.buffer_bytes
        if keep:
            self.held += len(data)
        self._pin(info.name, True)
        self._owe(+1)
        self._queue.append(_Copy(info, data if keep else None))
        self._ready.set()

    def _owe(self, n: int) -> None:
        self.owed += n
        self.stats.set(write_back_owed=self.owed, write_back_held_bytes=self.held)
        if self.owed < MAX_QUEUED:
            self._room.set()
        if self.owed == 0:
            self._idle.set()
        else:
            self._idle.clear()

    def _pin(self, name: str, on: bool) -> None:
        budget = getattr(self.first, "budget", None)
        if budget is not None:
            (budget.pinned.add if on else budget.pinned.discard)(name)

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            c = self._queue.popleft()
            try:
                await self._copy(c)
            except (StoreError, CorruptObject, asyncio.TimeoutError) as e:
                if self._release(c) and not isinstance(e, (NotFound, CorruptObject, NameTaken)):
                    self._retry(c, e)
                    continue
                self._done(c, ok=False, why=e)
            except asyncio.CancelledError:
                self._queue.appendleft(c)  # still owed: counted by drain's report
                raise
            except Exception as e:  # noqa: BLE001 - a worker must not die
                self._release(c)
                self._done(c, ok=False, why=e)
            else:
                self._release(c)
                self._done(c, ok=True)

    async def _copy(self, c: _Copy) -> None:
        data, info = c.data, c.info
        if data is None:
            if not self.first.index.has_object(info.name):
                raise NotFound(f"{info.name} left the first tier before its copy")
            data = await self.first.read(info)
            h = decode_header(data)
            if h.digest != info.digest or len(data) != h.size:  # rewritten or damaged meanwhile
                raise CorruptObject(f"{info.name} changed in {self.first.name} before its copy")
            info = ObjectInfo.from_header(info.name, h)  # with its keys, for the index below
        for t in self.tiers[1:]:
            if not t.index.has_object(info.name):
                await t.write(info, data)

    def _release(self, c: _Copy) -> bool:
        """Let go of the copy's bytes; True if the first tier still holds the object."""
        if c.data is not None:
            self.held -= len(c.data)
            c.data = None
        return self.first.index.has_object(c.info.name)

    def _retry(self, c: _Copy, e: BaseException) -> None:
        c.attempts += 1
        wait = min(BACKOFF[1], BACKOFF[0] * 2 ** (c.attempts - 1))
        self.stats.add(write_back_retries=1)
        if c.attempts == 1 or c.attempts % 10 == 0:
            log.warning("objectcache: copy of %s below the first tier failed (attempt %d, next in %.0f s): %s",
                        c.info.name, c.attempts, wait, e)
        handle = asyncio.get_running_loop().call_later(wait, lambda: self._requeue(handle))
        self._backoff[handle] = c

    def _requeue(self, handle: asyncio.TimerHandle) -> None:
        c = self._backoff.pop(handle, None)
        if c is not None:
            self._queue.append(c)
            self._ready.set()

    def _done(self, c: _Copy, ok: bool, why: BaseException | None = None) -> None:
        self._pin(c.info.name, False)
        self._owe(-1)
        if ok:
            self.stats.add(write_back_copied=1)
        else:
            self.stats.add(write_back_dropped=1)
            log.warning("objectcache: copy of %s below the first tier given up: %s", c.info.name, why)

    async def resume(self) -> int:
        """At start: queue the copies owed from before (first-tier objects the last tier lacks)."""
        last = self.tiers[-1].index
        owed = [info for info in self.first.index.objects() if not last.has_object(info.name)]
        for info in owed:
            await self.wait_for_room()
            self.submit(info, None)
        if owed:
            log.info("objectcache: %d copies below the first tier were owed from before; queued", len(owed))
        return len(owed)

    async def wait_idle(self, timeout: float) -> bool:
        """Until nothing is owed (True) or `timeout` passes (False); the queue keeps running."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def drain(self, timeout: float) -> tuple[int, int]:
        """Until nothing is owed or `timeout` passes; then stop. Returns (copies left, of them held in memory)."""
        for h in list(self._backoff):  # a retry waiting for its backoff goes now
            h.cancel()
            self._requeue(h)
        await self.wait_idle(timeout)
        left, held = self.owed, sum(1 for c in self._queue if c.data is not None)
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if left:
            self.stats.add(write_back_left_at_shutdown=left)
            log.warning("objectcache: shutdown with %d copies below the first tier still owed (they stay in %s "
                        "and are queued again at the next start)", left, self.first.name)
        return left, held
