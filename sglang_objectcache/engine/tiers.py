"""A tier = a store + the index of what it holds + its own housekeeping.

`Tier` reads and writes whole objects and ranges through its store under its connection slots.
The S3 tier adds the manifest journal (`journal.py`) that shares its index with other instances,
the read scheduler that shares its bandwidth between requests (`scheduler.py`) and, for `http://`
endpoints, a range reader whose pull threads receive ranges straight into their targets
(`stores/base.RangeReader`). The disk tier (`disk_tier.py`) adds a byte budget.
"""

from __future__ import annotations

import collections
from typing import Callable

from ..errors import AlreadyExists
from ..keys import Namespace
from ..stores.base import ObjectStore, RangeReader
from .index import Index, ObjectInfo
from .journal import ManifestJournal
from .scheduler import ReadScheduler
from .slots import PrioritySlots


class Tier:
    kind = "tier"
    range_reader: RangeReader | None = None  # S3 tiers with the native reader read on pull threads
    scheduler: ReadScheduler | None = None  # S3 tiers share their bandwidth between requests

    def __init__(self, name: str, store: ObjectStore, ns: Namespace, slots: PrioritySlots):
        self.name = name
        self.store = store
        self.ns = ns
        self.index = Index()
        self.slots = slots
        self.requests: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        """Build the index; raise StoreError if the tier is unusable."""

    async def read(self, info: ObjectInfo):
        async with self.slots.acquire(write=False):
            self.requests["get"] += 1
            return await self.store.get(info.name)

    async def read_range(self, name: str, start: int, end: int):
        async with self.slots.acquire(write=False):
            self.requests["get"] += 1
            return await self.store.get(name, start=start, end=end)

    async def write(self, info: ObjectInfo, data) -> None:
        async with self.slots.acquire(write=True):
            self.requests["put"] += 1
            try:
                await self.store.put(info.name, data, create_only=True)
            except AlreadyExists:
                pass  # same name, same pages: another writer got there first
        self.index.add(info)

    async def drop_corrupt(self, name: str) -> None:
        """An object found corrupt (already banned from the index): remove our own copy, if the
        tier holds copies of its own. Shared S3 objects are never deleted here."""

    async def clear(self) -> int:
        """Delete every object of this namespace in this tier; returns how many."""
        self.index.clear()
        names = [p for p, _ in await self.store.list(self.ns.root)]
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
                 range_reader: RangeReader | None = None):
        super().__init__(name, store, ns, PrioritySlots(max_connections, max_write_connections))
        self.range_reader = range_reader
        self.scheduler = scheduler
        self.startup_timeout = startup_timeout
        self.journal = ManifestJournal(store, ns, self.index, self.slots, self.requests,
                                       refresh_interval=refresh_interval, flush_interval=flush_interval)

    def pull(self, job: Callable[[], None], dropped: Callable[[], None]) -> None:
        """Run `job` (one range read, received, verified and copied there) on a pull thread of the
        range reader; on the loop, at the read's grant. `dropped()` runs instead if the threads
        shut down first."""
        self.requests["get"] += 1
        self.range_reader.pull(job, dropped)

    async def start(self) -> None:
        await self.journal.start(self.startup_timeout)

    async def write(self, info: ObjectInfo, data) -> None:
        await super().write(info, data)
        self.journal.record(info)

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
        await self.journal.stop()
        if self.scheduler is not None:
            self.scheduler.close()  # reads waiting for a grant end now, as misses
        if self.range_reader is not None:
            self.range_reader.close()
        await super().stop()
