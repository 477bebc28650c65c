"""A tier = a store + the index of what it holds + its own housekeeping.

`Tier` reads and writes whole objects and ranges through its store under its connection slots.
The S3 tier adds the manifest journal (`journal.py`) that shares its index with other instances,
the read scheduler that shares its bandwidth between requests (`scheduler.py`) and, for `http://`
endpoints, a range reader whose pull threads receive ranges straight into their targets
(`stores/base.RangeReader`). The disk tier (`disk_tier.py`) adds a byte budget.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Callable

from ..errors import AlreadyExists, CorruptObject, NameTaken, StoreError
from ..format import Header, decode_meta, mac_ok
from ..keys import Namespace
from ..stores.base import ObjectStore, RangeReader
from .gc import Collector
from .headers import HeaderCache
from .index import Index, ObjectInfo
from .journal import ManifestJournal
from .scheduler import ReadScheduler
from .slots import PrioritySlots

log = logging.getLogger("sglang_objectcache")


async def read_footer(store: ObjectStore, name: str, size: int) -> Header:
    """An object's footer from its last bytes (two ranged GETs where the footer is long)."""
    tail = await store.get(name, start=max(0, size - 65536), end=size)
    h = decode_meta(tail)
    if h.meta_bytes > len(tail):
        h = decode_meta(await store.get(name, start=max(0, size - h.meta_bytes), end=size))
    return h


class Health:
    """A tier whose server could not be reached sits out `exists()` and reads for a while, so that
    SGLang recomputes instead of admitting hits the tier cannot serve; it comes back by itself
    when the window ends (the next read tries it), sooner after any read succeeds. The window
    doubles with each failure in a row, from `base` to `cap` seconds."""

    def __init__(self, name: str, base: float = 1.0, cap: float = 30.0):
        self.name = name
        self.base = base
        self.cap = cap
        self.failures = 0
        self.down_until = 0.0
        self._lock = threading.Lock()

    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, why: object) -> None:
        """A request found the server unreachable. Failures while the tier already sits out (the
        other ranges of the same fetches) do not lengthen the window."""
        with self._lock:
            now = time.monotonic()
            if now < self.down_until:
                return
            self.failures += 1
            window = min(self.cap, self.base * 2 ** (self.failures - 1))
            self.down_until = now + window
        log.warning("objectcache: tier %s unavailable (%s); left out of lookups for %.0f s", self.name, why, window)

    def ok(self) -> None:
        if self.failures:  # a read landed: the server is back
            with self._lock:
                self.failures, self.down_until = 0, 0.0
            log.info("objectcache: tier %s is back", self.name)


class Tier:
    kind = "tier"
    range_reader: RangeReader | None = None  # S3 tiers with the native reader read on pull threads
    mac_key: bytes | None = None  # keyed integrity mode: what a stored footer's MAC must verify under
    scheduler: ReadScheduler | None = None  # S3 tiers share their bandwidth between requests

    def __init__(self, name: str, store: ObjectStore, ns: Namespace, slots: PrioritySlots):
        self.name = name
        self.store = store
        self.ns = ns
        self.index = Index(ns.root)
        self.headers = HeaderCache()  # footers of the objects in use (the index holds no checksums)
        self.slots = slots
        self.health = Health(name)
        self.requests: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        """Build the index; raise StoreError if the tier is unusable."""

    async def read(self, info: ObjectInfo):
        async with self.slots.acquire(write=False):
            self.requests["get"] += 1
            return await self.store.get(info.name)

    async def header(self, info: ObjectInfo) -> Header:
        """An object's footer: one ranged GET of exactly its last `meta_bytes`."""
        async with self.slots.acquire(write=False):
            self.requests["get"] += 1
            tail = await self.store.get(info.name, start=info.data_bytes, end=info.size)
        return decode_meta(tail)

    async def read_range(self, name: str, start: int, end: int):
        async with self.slots.acquire(write=False):
            self.requests["get"] += 1
            return await self.store.get(name, start=start, end=end)

    async def write(self, info: ObjectInfo, data) -> ObjectInfo:
        """Put the object create-only and index it. Where another writer got there first (same
        name, same pages, maybe other bytes: prefill need not be bitwise deterministic), the stored
        object is indexed as its footer describes it, never ours; StoreError if it cannot be
        (unreadable, another geometry, or not written with the integrity key): the pages are not
        stored, as far as this writer can tell."""
        async with self.slots.acquire(write=True):
            self.requests["put"] += 1
            try:
                await self.store.put(info.name, data, create_only=True)
                self.headers.put(info.name, decode_meta(data))  # it is likely read soon
            except AlreadyExists:
                info = await self._adopt(info)
        self.index.add(info)
        return info

    async def _adopt(self, mine: ObjectInfo) -> ObjectInfo:
        """The stored object of the name `mine` lost to, from its footer. StoreError where its
        footer cannot be read now (worth a retry); NameTaken where it can never be used."""
        try:
            self.requests["get"] += 1
            h = await read_footer(self.store, mine.name, mine.size)
        except CorruptObject as e:
            log.warning("objectcache: %s exists but its footer is unusable (%s); not indexed", mine.name, e)
            raise NameTaken(f"{mine.name} exists and its footer is unusable") from None
        except StoreError as e:
            log.warning("objectcache: %s exists but its footer cannot be read (%s); not indexed", mine.name, e)
            raise StoreError(f"{mine.name} exists and its footer cannot be read now: {e}") from None
        if self.mac_key is not None and not mac_ok(h, self.mac_key):
            log.warning("objectcache: %s exists but was not written with the integrity key; not indexed", mine.name)
            raise NameTaken(f"{mine.name} exists and was not written with the integrity key")
        theirs = ObjectInfo.from_header(mine.name, h)
        if not theirs.same_shape(mine) or theirs.hashes != mine.hashes:
            log.warning("objectcache: %s exists with other pages or another geometry; not indexed", mine.name)
            raise NameTaken(f"{mine.name} exists with other pages or another geometry")
        self.headers.put(mine.name, h)
        return theirs

    def used(self, name: str) -> None:
        """A read of the object completed (on the loop): recency for whoever evicts."""

    async def discard(self, name: str) -> None:
        """An object found corrupt (already banned from the index): remove our own copy, if the
        tier holds copies of its own. Shared S3 objects are never deleted here."""

    async def forget(self, name: str) -> None:
        """An object a read found missing (already out of this instance's index): tell whoever
        shares the index."""

    async def clear(self) -> int:
        """Delete every object of this namespace in this tier; returns how many."""
        self.index.clear()
        self.headers.clear()
        names = [e.path for e in await self.store.list(self.ns.root)]
        self.requests["list"] += 1
        await self.store.delete(names)
        self.requests["delete"] += 1
        return len(names)

    async def flush(self) -> None:
        """Publish what other instances should learn (the S3 tier's manifests)."""

    def nudge(self) -> None:
        """An index miss: look for other instances' writes soon, if the tier shares an index."""

    async def stop(self) -> None:
        await self.store.close()

    def stats(self) -> dict:
        return {"pages": self.index.n_pages, "objects": self.index.n_objects,
                "requests": dict(self.requests)}


class S3Tier(Tier):
    kind = "s3"

    def __init__(self, name: str, store: ObjectStore, ns: Namespace, *, max_connections: int,
                 max_write_connections: int, refresh_interval: float, flush_interval: float,
                 startup_timeout: float, scheduler: ReadScheduler | None = None,
                 range_reader: RangeReader | None = None, clock: Callable[[], float] = time.time,
                 capacity: int | None = None, max_age: float | None = None, gc_interval: float = 60.0):
        super().__init__(name, store, ns, PrioritySlots(max_connections, max_write_connections))
        self.range_reader = range_reader
        self.scheduler = scheduler
        self.startup_timeout = startup_timeout
        self.journal = ManifestJournal(store, ns, self.index, self.slots, self.requests,
                                       refresh_interval=refresh_interval, flush_interval=flush_interval,
                                       clock=clock)
        self.collector = Collector(self, capacity, max_age, gc_interval)
        self._gc: asyncio.Task | None = None

    def pull(self, job: Callable[[], None], dropped: Callable[[], None]) -> None:
        """Run `job` (one range read, received, verified and copied there) on a pull thread of the
        range reader; on the loop, at the read's grant. `dropped()` runs instead if the threads
        shut down first."""
        self.requests["get"] += 1
        self.range_reader.pull(job, dropped)

    async def start(self) -> None:
        await self.journal.start(self.startup_timeout)
        if self.collector.capacity is not None or self.collector.max_age is not None:
            self._gc = asyncio.create_task(self.collector.loop())

    async def write(self, info: ObjectInfo, data) -> ObjectInfo:
        info = await super().write(info, data)
        self.index.touch(info.name, self.journal.now_ms() // 1000)
        self.journal.record(info)
        return info

    def used(self, name: str) -> None:
        self.index.touch(name, self.journal.now_ms() // 1000)
        self.journal.record_use(name)

    def stats(self) -> dict:
        return {**super().stats(), **self.collector.stats()}

    async def forget(self, name: str) -> None:
        self.journal.retract(name)

    def nudge(self) -> None:
        self.journal.nudge()

    async def flush(self) -> None:
        await self.journal.flush()

    async def clear(self) -> int:
        self.journal.drop_pending()
        n = await super().clear()
        self.journal.forget_seen()  # the namespace is empty: read every manifest written from now on
        return n

    async def stop(self) -> None:
        if self._gc is not None:
            self._gc.cancel()
            await asyncio.gather(self._gc, return_exceptions=True)
        await self.journal.stop()
        if self.scheduler is not None:
            self.scheduler.close()  # reads waiting for a grant end now, as misses
        if self.range_reader is not None:
            self.range_reader.close()
        await super().stop()
