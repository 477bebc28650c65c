"""A tier = a store + the index of what it holds + its own housekeeping.

The disk tier keeps a byte budget (least recently used objects leave first) and rebuilds its
index from the directory at start. The S3 tier shares its index with other instances through a
journal of small manifest objects under `<namespace>/m/`: each instance appends what it wrote,
and every instance lists new manifests every `index_refresh_interval`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import logging
import os
import time
import uuid
from typing import Callable

import msgpack

from ..format import CorruptObject, decode_meta
from ..keys import Namespace
from ..stores.base import AlreadyExists, NotFound, ObjectStore, StoreError
from .index import Index, ObjectInfo
from .slots import PrioritySlots

log = logging.getLogger("sglang_objectcache")

# A manifest written at time t may become listable a little after one written at t+d by another
# instance; re-listing this far back catches it (names already seen are skipped).
MANIFEST_SKEW_MS = 60_000


class Tier:
    kind = "tier"
    range_reader = None  # S3 tiers with the native reader (stores/rawhttp.py) read on pull threads

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

    async def clear(self) -> int:
        """Delete every object of this namespace in this tier; returns how many."""
        self.index.clear()
        names = [p for p, _ in await self.store.list(self.ns.root)]
        self.requests["list"] += 1
        await self.store.delete(names)
        self.requests["delete"] += 1
        return len(names)

    async def stop(self) -> None:
        await self.store.close()

    def stats(self) -> dict:
        return {"pages": self.index.n_pages, "objects": self.index.n_objects,
                "requests": dict(self.requests)}


class DiskTier(Tier):
    kind = "disk"

    def __init__(self, name: str, store: ObjectStore, ns: Namespace, capacity: int):
        # Local files: plenty of parallelism, and no network to protect.
        super().__init__(name, store, ns, PrioritySlots(64, 32))
        self.capacity = capacity
        self._lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.used = 0
        self._evict_lock = asyncio.Lock()

    async def start(self) -> None:
        found = await self.store.list(self.ns.root + "d/")
        for name, size in found:
            try:
                tail = await self.store.get(name, start=max(0, size - 65536), end=size)
                h = decode_meta(tail)
                if h.meta_bytes > len(tail):
                    h = decode_meta(await self.store.get(name, start=max(0, size - h.meta_bytes), end=size))
            except (CorruptObject, StoreError) as e:
                log.warning("disk tier: dropping unreadable %s (%s)", name, e)
                await self.store.delete([name])
                continue
            info = ObjectInfo.from_header(name, h)
            if info.size != size:
                log.warning("disk tier: dropping truncated %s (%d of %d bytes)", name, size, info.size)
                await self.store.delete([name])
                continue
            self.index.add(info)
            self._lru[name] = size
            self.used += size
        await self._reserve("", 0)
        if found:
            log.info("disk tier %s: %d objects, %.1f MiB", self.name, len(self._lru), self.used / 2**20)

    async def read(self, info: ObjectInfo):
        if info.name in self._lru:
            self._lru.move_to_end(info.name)
        return await super().read(info)

    async def _reserve(self, name: str, size: int) -> None:
        """Evict least recently used objects until `size` more bytes fit, and book them now,
        so concurrent writes cannot overshoot the capacity together."""
        async with self._evict_lock:
            victims = []
            while self._lru and self.used + size > self.capacity:
                victim, vsize = self._lru.popitem(last=False)
                self.used -= vsize
                self.index.remove(victim)
                victims.append(victim)
            if name:
                self._lru[name] = size
                self.used += size
            if victims:
                await self.store.delete(victims)

    async def write(self, info: ObjectInfo, data) -> None:
        if info.size > self.capacity:
            raise StoreError(f"object of {info.size} bytes exceeds the disk tier capacity")
        if info.name in self._lru:
            self._lru.move_to_end(info.name)
            return
        await self._reserve(info.name, info.size)
        try:
            await super().write(info, data)
        except BaseException:
            if self._lru.pop(info.name, None) is not None:
                self.used -= info.size
            raise

    async def drop(self, name: str) -> None:
        """Remove a bad local copy (on the loop thread, which owns the LRU)."""
        self.index.remove(name)
        size = self._lru.pop(name, None)
        if size is not None:
            self.used -= size
        await self.store.delete([name])

    async def clear(self) -> int:
        n = await super().clear()
        self._lru.clear()
        self.used = 0
        return n

    def stats(self) -> dict:
        return {**super().stats(), "used_bytes": self.used, "capacity_bytes": self.capacity}


class S3Tier(Tier):
    kind = "s3"

    def __init__(self, name: str, store: ObjectStore, ns: Namespace, *, max_connections: int,
                 max_write_connections: int, refresh_interval: float, flush_interval: float,
                 startup_timeout: float, scheduler=None, range_reader=None, staging_bytes: int = 16 << 20,
                 receive_pieces: bool = True):
        super().__init__(name, store, ns, PrioritySlots(max_connections, max_write_connections))
        # stores/rawhttp.py: range reads on pull threads, each received, verified and copied there
        self.range_reader = range_reader
        self.receive_pieces = receive_pieces  # check and copy each piece as it arrives, no staging
        self._pullers = None
        if range_reader is not None:
            from ..stores.rawhttp import StagingBuffers

            self._pullers = cf.ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="objectcache-pull")
            self._staging = StagingBuffers(max_connections, staging_bytes)
        self.refresh_interval = refresh_interval
        self.flush_interval = flush_interval
        self.startup_timeout = startup_timeout
        self.scheduler = scheduler  # engine.scheduler.ReadScheduler: who reads next, under the cap
        self.writer = f"{uuid.uuid4().hex[:8]}{os.getpid():x}"
        self._seq = 0
        self._pending: list[ObjectInfo] = []
        self._seen: set[str] = set()
        self._last_ms = 0
        self._nudge = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_nudge = 0.0
        self._tasks: list[asyncio.Task] = []
        self.last_refresh = 0.0

    def source(self, name: str, start: int, end: int):
        """One range for a pull thread to receive (stores/rawhttp.py): whole, into a reused buffer,
        or piece by piece into its targets."""
        from ..stores.rawhttp import RangeSource

        return RangeSource(self.range_reader, self._staging, name, start, end, self.receive_pieces)

    def start_pull(self, job: Callable[[], None], dropped: Callable[[], None]) -> None:
        """Run `job` (one range read, received, verified and copied there) on a pull thread; on
        the loop, at the read's grant. `dropped()` runs instead if the threads shut down first."""
        self.requests["get"] += 1
        try:
            fut = self._pullers.submit(job)
        except RuntimeError:  # shut down: the engine is closing
            dropped()
            return
        fut.add_done_callback(lambda f: dropped() if f.cancelled() else None)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.wait_for(self.refresh(), self.startup_timeout)
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._refresh_loop())]

    async def write(self, info: ObjectInfo, data) -> None:
        await super().write(info, data)
        self._pending.append(info)

    def nudge(self) -> None:
        """Ask for an early refresh (an index miss may be another instance's fresh write). Called
        from SGLang's threads: at most every 0.2 s, and handed to the loop thread-safely."""
        now = time.monotonic()
        if self._loop is None or now - self._last_nudge < 0.2:
            return
        self._last_nudge = now
        self._loop.call_soon_threadsafe(self._nudge.set)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self._seq += 1
        name = f"{self.ns.manifest_prefix}{int(time.time() * 1000):013d}-{self.writer}-{self._seq:06d}"
        body = msgpack.packb({"v": 1, "objects": [i.to_wire(self.ns.root) for i in batch]}, use_bin_type=True)
        try:
            async with self.slots.acquire(write=True):
                self.requests["put"] += 1
                await self.store.put(name, body, create_only=False)
            self._seen.add(name)
        except StoreError as e:
            self._pending[:0] = batch  # keep them for the next try
            log.warning("s3 tier: manifest write failed, will retry: %s", e)

    async def refresh(self) -> int:
        """Learn objects from manifests written since the last refresh; returns how many."""
        start_after = None
        if self._last_ms:
            start_after = f"{self.ns.manifest_prefix}{max(0, self._last_ms - MANIFEST_SKEW_MS):013d}"
        async with self.slots.acquire(write=False):
            self.requests["list"] += 1
            listed = await self.store.list(self.ns.manifest_prefix, start_after=start_after)
        new = [p for p, _ in listed if p not in self._seen and f"-{self.writer}-" not in p]
        learned = 0

        async def fetch(path: str) -> None:
            nonlocal learned
            try:
                async with self.slots.acquire(write=False):
                    self.requests["get"] += 1
                    body = await self.store.get(path)
                doc = msgpack.unpackb(bytes(body), raw=False)
                for w in doc["objects"]:
                    self.index.add(ObjectInfo.from_wire(self.ns.root, w))
                    learned += 1
                self._seen.add(path)
            except NotFound:
                self._seen.add(path)  # cleared meanwhile
            except (StoreError, ValueError, KeyError, TypeError, IndexError) as e:
                log.warning("s3 tier: skipping unreadable manifest %s: %s", path, e)
                self._seen.add(path)

        await asyncio.gather(*(fetch(p) for p in new))
        for p, _ in listed:
            try:
                self._last_ms = max(self._last_ms, int(p[len(self.ns.manifest_prefix):].split("-")[0]))
            except ValueError:
                pass
        self.last_refresh = time.monotonic()
        return learned

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._nudge.wait(), self.refresh_interval)
                await asyncio.sleep(0.05)  # coalesce a burst of nudges
            except asyncio.TimeoutError:
                pass
            self._nudge.clear()
            try:
                await self.refresh()
            except StoreError as e:
                log.warning("s3 tier: index refresh failed (will retry): %s", e)
            except Exception:  # noqa: BLE001 - this loop must survive anything
                log.exception("s3 tier: index refresh failed")

    async def clear(self) -> int:
        self._pending.clear()
        n = await super().clear()
        self._seen.clear()
        self._last_ms = 0
        return n

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.flush()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        if self.scheduler is not None:
            self.scheduler.close()  # reads waiting for a grant end now, as misses
        if self._pullers is not None:
            self._pullers.shutdown(wait=False, cancel_futures=True)
            self.range_reader.close()
        await super().stop()
