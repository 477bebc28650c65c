"""The manifest journal: how instances sharing an S3 namespace learn each other's objects.

Each instance appends what it wrote, and what it found gone, as small msgpack manifests under
`<namespace>/m/`, named `<ms since epoch>-<writer>-<seq>` so that a listing returns them in time
order; every instance lists manifests newer than the last it saw every `index_refresh_interval`
(sooner when nudged by an index miss) and applies them to its index in name order: announced
objects are added, retracted ones (tombstones) removed. `docs/format.md` describes a manifest.

Checkpoints (`checkpoints.py`) fold the journal so that a new instance reads a short tail.

Clocks: the milliseconds in a name are the server's time, not the writer's (each instance
measures the offset of its clock from the server's through a probe object's Last-Modified), so
instances whose clocks disagree by minutes still order their manifests within about a second;
and the listing cursor never runs ahead of this instance's own (server-corrected) now, so a
manifest named in the future by a writer that could not measure cannot hide later ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
import uuid
from typing import Callable

import msgpack

from ..errors import NotFound, StoreError
from ..keys import Namespace
from .checkpoints import CHECKPOINT_AFTER, DELETE_DELAY, MANIFEST_SKEW_MS, Checkpoints, name_ms as _name_ms
from .index import Index, ObjectInfo
from .slots import PrioritySlots

log = logging.getLogger("sglang_objectcache")

NUDGE_EVERY = 1.0  # seconds: at most one early refresh per this long, however many index misses
GET_ATTEMPTS = 5  # a manifest whose GET keeps failing is tried this many refreshes, then skipped
CLOCK_EVERY = 600.0  # seconds between measurements of the server's clock
USE_EVERY = 30.0  # seconds: reads are published at most this often on their own (they ride along otherwise)


class ManifestJournal(Checkpoints):
    def __init__(self, store, ns: Namespace, index: Index, slots: PrioritySlots,
                 requests: collections.Counter, *, refresh_interval: float, flush_interval: float,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.ns = ns
        self.index = index
        self.slots = slots
        self.requests = requests  # the tier's request counts
        self.refresh_interval = refresh_interval
        self.flush_interval = flush_interval
        self.clock = clock  # this machine's wall clock (tests inject skew)
        self.offset = 0.0  # the server's clock minus ours, seconds (`sync_clock`)
        self.writer = f"{uuid.uuid4().hex[:8]}{os.getpid():x}"
        self._seq = 0
        self._pending: list[ObjectInfo] = []
        self._gone: list[str] = []  # objects found missing, retracted with the next flush
        self._uses: set[str] = set()  # objects read since the last flush (any thread adds)
        self._uses_at = time.monotonic()  # when reads were last published
        self._failed: dict[str, int] = {}  # manifests whose GET failed: attempts so far
        self._seen: set[str] = set()
        self._last_ms = 0
        self._nudge = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_nudge = 0.0
        self._tasks: list[asyncio.Task] = []
        self._flushing = asyncio.Lock()  # one flush at a time: a flush publishes all recorded before it
        self.last_refresh = 0.0
        self.delete_delay = DELETE_DELAY
        self.use_every = USE_EVERY
        self.checkpoint_after = CHECKPOINT_AFTER
        self._epoch = 0  # the newest checkpoint this instance knows of
        self._cover = 0  # ms: manifests named before it are in the checkpoint this instance loaded
        self._since = 0  # manifests applied or written since the newest checkpoint known
        self._jitter = 1 + random.random() / 2
        self._checkpointing: asyncio.Task | None = None
        self.deleting: asyncio.Task | None = None  # the deletion after the last checkpoint written

    async def start(self, timeout: float) -> None:
        """Learn what the namespace holds now (within `timeout`), then keep flushing and refreshing."""
        self._loop = asyncio.get_running_loop()
        await asyncio.wait_for(self._start(), timeout)
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._refresh_loop()),
                       asyncio.create_task(self._clock_loop())]

    async def _start(self) -> None:
        await self.sync_clock()
        await self.load_checkpoint()
        await self.refresh()

    def now_ms(self) -> int:
        """The server's time as this instance best knows it, in milliseconds."""
        return int((self.clock() + self.offset) * 1000)

    async def sync_clock(self) -> None:
        """Measure the server's clock: put a probe object and read its Last-Modified (whole seconds
        on S3: the put happened within the second after it). Best effort: on failure the offset
        stays as it was, with a warning."""
        name = f"{self.ns.root}c/{self.writer}"
        try:
            async with self.slots.acquire(write=True):
                self.requests["clock"] += 1  # a PUT, a HEAD and a DELETE
                t0 = self.clock()
                await self.store.put(name, b"", create_only=False)
                t1 = self.clock()
                modified = (await self.store.head(name)).modified
                await self.store.delete([name])
        except StoreError as e:
            log.warning("s3 tier: cannot read the server's clock (manifests are named by ours): %s", e)
            return
        offset = modified + 0.5 - (t0 + t1) / 2
        if abs(offset - self.offset) > 5:
            log.info("s3 tier: this machine's clock differs from the server's by %.1f s; manifests are named "
                     "by the server's", -offset)
        self.offset = offset

    def record(self, info: ObjectInfo) -> None:
        """An object this instance wrote: announced with the next flush. On the loop."""
        self._pending.append(info)

    def retract(self, name: str) -> None:
        """An object found missing: other instances stop claiming it after the next flush. On the loop."""
        self._gone.append(name)

    def record_use(self, name: str) -> None:
        """An object read here: its use is published with a later manifest, so that garbage
        collection anywhere orders by reads everywhere. Any thread; costs a set insertion."""
        self._uses.add(name)

    def nudge(self) -> None:
        """Ask for an early refresh (an index miss may be another instance's fresh write). Called
        from SGLang's threads: at most every NUDGE_EVERY, and handed to the loop thread-safely."""
        now = time.monotonic()
        if self._loop is None or now - self._last_nudge < NUDGE_EVERY:
            return
        self._last_nudge = now
        self._loop.call_soon_threadsafe(self._nudge.set)

    async def flush(self) -> None:
        """Publish the objects recorded and retracted so far as one manifest. A flush in progress
        is waited for, and one cut short (a failed or cancelled PUT) keeps its batch for the next."""
        async with self._flushing:
            uses_due = bool(self._uses) and time.monotonic() - self._uses_at >= self.use_every
            if not self._pending and not self._gone and not uses_due:
                return
            batch, self._pending = self._pending, []
            gone, self._gone = self._gone, []
            uses, self._uses = self._uses, set()
            self._seq += 1
            name = f"{self.ns.manifest_prefix}{self.now_ms():013d}-{self.writer}-{self._seq:06d}"
            root = len(self.ns.root)
            body = msgpack.packb({"v": 2, "objects": [i.to_wire(self.ns.root) for i in batch],
                                  "gone": [g[root:] for g in gone], "used": sorted(u[root:] for u in uses)},
                                 use_bin_type=True)
            try:
                async with self.slots.acquire(write=True):
                    self.requests["put"] += 1
                    await self.store.put(name, body, create_only=False)
                self._seen.add(name)
                self._since += 1
                self._uses_at = time.monotonic()
            except BaseException as e:
                self._pending[:0] = batch  # keep them for the next try (announcing twice is harmless)
                self._gone[:0] = gone
                self._uses |= uses
                if not isinstance(e, StoreError):
                    raise
                log.warning("s3 tier: manifest write failed, will retry: %s", e)

    async def refresh(self) -> int:
        """Apply the manifests written since the last refresh (and those whose GET failed before)
        in name order; returns how many objects they announced."""
        if self.last_refresh and time.monotonic() - self.last_refresh > self.delete_delay / 2:
            await self.load_checkpoint(newer_than=self._epoch)  # what was folded and deleted meanwhile
        start_after = None
        if self._last_ms:
            start_after = f"{self.ns.manifest_prefix}{max(0, self._last_ms - MANIFEST_SKEW_MS):013d}"
        async with self.slots.acquire(write=False):
            self.requests["list"] += 1
            listed = [e.path for e in await self.store.list(self.ns.manifest_prefix, start_after=start_after)]
        new = sorted({p for p in listed if p not in self._seen and f"-{self.writer}-" not in p
                      and (_name_ms(p, self.ns.manifest_prefix) or 0) >= self._cover} | set(self._failed))
        docs = await asyncio.gather(*(self._read(p) for p in new))
        learned = 0
        for path, doc in zip(new, docs):  # in name order: a later retraction wins, a later announcement too
            if doc is not None:
                learned += self._apply(path, doc)
                self._since += 1
        now = self.now_ms()
        for p in listed:  # never past our own now: a manifest named in the future must not hide later ones
            ms = _name_ms(p, self.ns.manifest_prefix)
            if ms is not None:
                self._last_ms = max(self._last_ms, min(ms, now))
        floor = self._last_ms - MANIFEST_SKEW_MS  # names below it are never listed again
        self._seen = {p for p in self._seen if (_name_ms(p, self.ns.manifest_prefix) or 0) >= floor}
        self.last_refresh = time.monotonic()
        return learned

    async def _read(self, path: str) -> dict | None:
        """One manifest's document; None if it is gone, unreadable, or (for now) unreachable."""
        doc = None
        try:
            async with self.slots.acquire(write=False):
                self.requests["get"] += 1
                body = await self.store.get(path)
            parsed = msgpack.unpackb(bytes(body), raw=False)
            if not isinstance(parsed, dict) or not isinstance(parsed.get("objects"), list):
                raise ValueError("not a manifest")
            doc = parsed
        except NotFound:
            pass  # cleared meanwhile
        except StoreError as e:  # the server, not the manifest: try again next refresh
            tries = self._failed[path] = self._failed.get(path, 0) + 1
            if tries < GET_ATTEMPTS:
                log.warning("s3 tier: cannot read manifest %s (attempt %d, will retry): %s", path, tries, e)
                return None
            log.warning("s3 tier: giving up on manifest %s after %d attempts: %s", path, tries, e)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            log.warning("s3 tier: skipping unreadable manifest %s: %s", path, e)
        self._failed.pop(path, None)  # read, gone, unreadable or given up on: done with it
        self._seen.add(path)
        return doc

    def _apply(self, path: str, doc: dict) -> int:
        """Announced objects into the index, retracted ones out, reads as uses at the manifest's
        time; an unreadable entry is skipped."""
        learned = 0
        second = (_name_ms(path, self.ns.manifest_prefix) or 0) // 1000
        for w in doc["objects"]:
            try:
                self.index.add(ObjectInfo.from_wire(self.ns.root, w), second)
                learned += 1
            except (ValueError, KeyError, TypeError, IndexError) as e:
                log.warning("s3 tier: skipping an entry of manifest %s: %s", path, e)
        for rel in doc.get("gone", ()):
            if isinstance(rel, str):
                self.index.remove(self.ns.root + rel)
        for rel in doc.get("used", ()):
            if isinstance(rel, str):
                self.index.touch(self.ns.root + rel, second)
        return learned

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def _clock_loop(self) -> None:
        while True:
            await asyncio.sleep(CLOCK_EVERY)
            await self.sync_clock()

    async def _refresh_loop(self) -> None:
        while True:
            # not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as the
            # event is set, and this loop would outlive stop()
            nudged = asyncio.ensure_future(self._nudge.wait())
            try:
                await asyncio.wait({nudged}, timeout=self.refresh_interval)
            finally:
                nudged.cancel()
            if self._nudge.is_set():
                await asyncio.sleep(0.05)  # coalesce a burst of nudges
            self._nudge.clear()
            try:
                await self.refresh()
                self._maybe_checkpoint()
            except StoreError as e:
                log.warning("s3 tier: index refresh failed (will retry): %s", e)
            except Exception:  # noqa: BLE001 - this loop must survive anything
                log.exception("s3 tier: index refresh failed")

    def drop_pending(self) -> None:
        """The namespace is being cleared: announce nothing written or found gone before."""
        self._pending.clear()
        self._gone.clear()
        self._uses.clear()

    def forget_seen(self) -> None:
        """The namespace was cleared: start listing from the beginning again."""
        self._seen.clear()
        self._failed.clear()
        self._last_ms = 0
        self._epoch = self._cover = self._since = 0

    async def stop(self) -> None:
        """Stop the loops and publish what is pending (best effort)."""
        tasks = self._tasks + [self._checkpointing] if self._checkpointing else self._tasks
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.flush()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
