"""The manifest journal: how instances sharing an S3 namespace learn each other's objects.

Each instance appends what it wrote as small msgpack manifests under `<namespace>/m/`, named
`<ms since epoch>-<writer>-<seq>` so that a listing returns them in time order; every instance
lists manifests newer than the last it saw every `index_refresh_interval` (sooner when nudged by
an index miss) and adds their objects to its index. `docs/format.md` describes a manifest's bytes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid

import msgpack

from ..errors import NotFound, StoreError
from ..keys import Namespace
from .index import Index, ObjectInfo
from .slots import PrioritySlots

log = logging.getLogger("sglang_objectcache")

# A manifest written at time t may become listable a little after one written at t+d by another
# instance; re-listing this far back catches it (names already seen are skipped).
MANIFEST_SKEW_MS = 60_000
NUDGE_EVERY = 0.2  # seconds: at most one early refresh per this long


class ManifestJournal:
    def __init__(self, store, ns: Namespace, index: Index, slots: PrioritySlots,
                 requests: collections.Counter, *, refresh_interval: float, flush_interval: float):
        self.store = store
        self.ns = ns
        self.index = index
        self.slots = slots
        self.requests = requests  # the tier's request counts
        self.refresh_interval = refresh_interval
        self.flush_interval = flush_interval
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

    async def start(self, timeout: float) -> None:
        """Learn what the namespace holds now (within `timeout`), then keep flushing and refreshing."""
        self._loop = asyncio.get_running_loop()
        await asyncio.wait_for(self.refresh(), timeout)
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._refresh_loop())]

    def record(self, info: ObjectInfo) -> None:
        """An object this instance wrote: announced with the next flush. On the loop."""
        self._pending.append(info)

    def nudge(self) -> None:
        """Ask for an early refresh (an index miss may be another instance's fresh write). Called
        from SGLang's threads: at most every NUDGE_EVERY, and handed to the loop thread-safely."""
        now = time.monotonic()
        if self._loop is None or now - self._last_nudge < NUDGE_EVERY:
            return
        self._last_nudge = now
        self._loop.call_soon_threadsafe(self._nudge.set)

    async def flush(self) -> None:
        """Publish the objects recorded since the last flush as one manifest."""
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
        learned = sum(await asyncio.gather(*(self._apply(p) for p in new)))
        for p, _ in listed:
            try:
                self._last_ms = max(self._last_ms, int(p[len(self.ns.manifest_prefix):].split("-")[0]))
            except ValueError:
                pass
        self.last_refresh = time.monotonic()
        return learned

    async def _apply(self, path: str) -> int:
        """Read one manifest into the index; how many objects it added (those before an
        unreadable entry stay)."""
        learned = 0
        try:
            async with self.slots.acquire(write=False):
                self.requests["get"] += 1
                body = await self.store.get(path)
            for w in msgpack.unpackb(bytes(body), raw=False)["objects"]:
                self.index.add(ObjectInfo.from_wire(self.ns.root, w))
                learned += 1
        except NotFound:
            pass  # cleared meanwhile
        except (StoreError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("s3 tier: skipping unreadable manifest %s: %s", path, e)
        self._seen.add(path)
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

    def drop_pending(self) -> None:
        """The namespace is being cleared: announce nothing written before."""
        self._pending.clear()

    def forget_seen(self) -> None:
        """The namespace was cleared: start listing from the beginning again."""
        self._seen.clear()
        self._last_ms = 0

    async def stop(self) -> None:
        """Stop the loops and publish what is pending (best effort)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.flush()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
