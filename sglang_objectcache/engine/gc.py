"""Garbage collection of an S3 namespace: a byte budget and a maximum age, least recently used first.

What is stored comes from a LIST of the namespace's data objects (so objects nobody announced,
orphans of a crash, count and can go too); when each was last used comes from the index, which
learns reads and writes from every instance's manifests (`journal.py`: reads ride along, at most
one manifest every 30 s on their own), or else from the object's Last-Modified. A pass that finds the
namespace over `capacity` deletes the least recently used objects until it is at `LOW_WATER` of
it, and deletes objects unused for `max_age` whatever the size. Deleted objects are retracted in
the journal at once, so every instance stops claiming them within a refresh interval; a read that
races a deletion finds the object gone and heals (`docs/design.md`, "Healing"): a miss, never
wrong KV.

One instance collects at a time, by a lease: `<namespace>/g/<n>` objects written create-only. The
holder writes n+1 each pass (a renewal); when the newest lease is older than its time to live (by
the server's clock), any instance may write n+1, and one wins. A collector that crashed is
replaced after one time to live.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass

import msgpack

from ..errors import AlreadyExists, NotFound, StoreError

log = logging.getLogger("sglang_objectcache")

GRACE = 60.0  # s: objects written this recently are never collected (their announcement may be in flight)
LOW_WATER = 0.9  # a pass over the budget deletes down to this share of it
DELETE_BATCH = 1000  # objects per DeleteObjects request


@dataclass
class GcReport:
    objects: int = 0  # data objects found
    bytes: int = 0  # their bytes
    unindexed: int = 0  # of them, objects this index does not hold (orphans, or not learned yet)
    deleted: int = 0
    deleted_bytes: int = 0
    expired: int = 0  # of the deleted, those past max_age
    seconds: float = 0.0
    dry_run: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class Collector:
    def __init__(self, tier, capacity: int | None, max_age: float | None, interval: float):
        self.tier = tier  # engine.tiers.S3Tier
        self.capacity = capacity
        self.max_age = max_age
        self.interval = interval
        self.lease_ttl = 3 * interval
        self.grace = GRACE
        self.last: GcReport | None = None
        self.totals = {"passes": 0, "deleted": 0, "deleted_bytes": 0}
        self._left = 0  # bytes the last pass left
        self._added_mark = 0  # the index's added_bytes when the last pass listed
        self._holder_until = 0.0  # monotonic: this instance holds the lease until then

    def estimate(self) -> int:
        """The namespace's bytes now, without a request: what the last pass left, plus what the
        index learned was written since (every instance's writes reach it through the journal)."""
        return self._left + self.tier.index.added_bytes - self._added_mark

    @property
    def _lease_prefix(self) -> str:
        return f"{self.tier.ns.root}g/"

    async def take_lease(self) -> bool:
        """Become (or stay) the collector until the lease's time to live passes."""
        store, me = self.tier.store, self.tier.journal.writer
        self.tier.requests["list"] += 1
        leases = sorted((int(e.path[len(self._lease_prefix):]), e) for e in await store.list(self._lease_prefix)
                        if e.path[len(self._lease_prefix):].isdigit())
        n = 0
        if leases:
            n, newest = leases[-1]
            if newest.modified + self.lease_ttl > self.tier.journal.now_ms() / 1000:
                try:
                    self.tier.requests["get"] += 1
                    holder = msgpack.unpackb(bytes(await store.get(newest.path)), raw=False).get("holder")
                except (NotFound, ValueError, TypeError, AttributeError, msgpack.UnpackException):
                    holder = None
                if holder != me:
                    return False
        try:
            self.tier.requests["put"] += 1
            await store.put(f"{self._lease_prefix}{n + 1:010d}", msgpack.packb({"holder": me, "ttl": self.lease_ttl}),
                            create_only=True)
        except AlreadyExists:
            return False
        old = [e.path for _, e in leases]
        if old:
            self.tier.requests["delete"] += 1
            await store.delete(old)
        return True

    async def run_once(self, *, capacity: int | None = None, max_age: float | None = None,
                       dry_run: bool = False) -> GcReport:
        """One pass: list, choose, delete, retract. `capacity`/`max_age` override the configured."""
        capacity = self.capacity if capacity is None else capacity
        max_age = self.max_age if max_age is None else max_age
        t0 = time.monotonic()
        tier, index = self.tier, self.tier.index
        now = tier.journal.now_ms() / 1000
        added_mark = index.added_bytes
        tier.requests["list"] += 1
        listed = await tier.store.list(f"{tier.ns.root}d/")
        report = GcReport(objects=len(listed), bytes=sum(e.size for e in listed), dry_run=dry_run)
        items = []  # (last use, seconds since the epoch; path; size; too young to go)
        for e in listed:
            used = index.used(e.path)  # every instance's writes and reads, by the server's clock
            if used is None:
                report.unindexed += 1
            items.append((float(used) if used else e.modified, e.path, e.size, e.modified > now - self.grace))
        victims: list[tuple[str, int]] = []
        keep = []
        for last, path, size, young in items:
            if max_age is not None and not young and last < now - max_age:
                victims.append((path, size))
            else:
                keep.append((last, path, size, young))
        report.expired = len(victims)
        left = report.bytes - sum(s for _, s in victims)
        if capacity is not None and left > capacity:
            for last, path, size, young in sorted(keep):
                if left <= capacity * LOW_WATER:
                    break
                if not young:
                    victims.append((path, size))
                    left -= size
        report.deleted, report.deleted_bytes = len(victims), sum(s for _, s in victims)
        if victims and not dry_run:
            await self._delete([p for p, _ in victims])
        report.seconds = time.monotonic() - t0
        if not dry_run:
            self.last = report
            self._left, self._added_mark = report.bytes - report.deleted_bytes, added_mark
            self.totals["passes"] += 1
            self.totals["deleted"] += report.deleted
            self.totals["deleted_bytes"] += report.deleted_bytes
        return report

    async def _delete(self, names: list[str]) -> None:
        """Forget, retract, delete: every instance stops claiming them with the next manifest."""
        tier = self.tier
        for name in names:
            tier.index.remove(name)
            tier.headers.drop(name)
            tier.journal.retract(name)
        await tier.journal.flush()  # others stop claiming them before the bytes go
        for i in range(0, len(names), DELETE_BATCH):
            async with tier.slots.acquire(write=True):
                tier.requests["delete"] += 1
                await tier.store.delete(names[i:i + DELETE_BATCH])
        log.info("s3 tier %s: garbage collection deleted %d objects", tier.name, len(names))

    async def loop(self) -> None:
        """Every interval (with jitter): take the lease, then run a pass; and, while holding the
        lease, at once whenever the estimate says the budget is passed (checked every second or
        quarter interval, without a request; passes at least a quarter interval apart), so that the bucket overshoots by what is written in
        about a refresh interval, not in a whole `gc_interval`. Never raises."""
        due = time.monotonic() + self.interval * (0.75 + random.random() / 2)
        last_pass, min_gap = 0.0, max(1.0, self.interval / 4)
        while True:
            await asyncio.sleep(min(1.0, self.interval / 4))
            now = time.monotonic()
            over = (self.capacity is not None and self.last is not None and now < self._holder_until
                    and now - last_pass >= min_gap and self.estimate() > self.capacity)
            if now < due and not over:
                continue
            due, last_pass = now + self.interval * (0.75 + random.random() / 2), now
            try:
                if await self.take_lease():
                    self._holder_until = time.monotonic() + self.lease_ttl / 2
                    r = await self.run_once()
                    if r.deleted:
                        log.info("s3 tier %s: %d objects, %.1f GiB; deleted %d (%.1f GiB, %d past max_age)",
                                 self.tier.name, r.objects, r.bytes / 2**30, r.deleted, r.deleted_bytes / 2**30,
                                 r.expired)
                else:
                    self._holder_until = 0.0
            except StoreError as e:
                log.warning("s3 tier %s: garbage collection failed (will retry): %s", self.tier.name, e)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("s3 tier %s: garbage collection failed", self.tier.name)

    def stats(self) -> dict:
        out = {f"gc_{k}": v for k, v in self.totals.items()}
        if self.last is not None:
            out.update(stored_objects=self.last.objects - self.last.deleted,
                       stored_bytes=self.last.bytes - self.last.deleted_bytes, unindexed_objects=self.last.unindexed)
        return out
