"""The disk tier: a local directory with a byte budget, least recently used objects leaving first.

The budget is the directory's, shared by every process that writes into it, and kept by the store
itself (`stores/disk_budget.py`): each write makes room under a lock on the directory. Recency is
each file's modification time, which every completed read refreshes, whole or in ranges. The index
is rebuilt from the directory at start: each object's footer says what it holds; unreadable,
truncated or zeroed files, and temporary files left by a crash, are deleted.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import CorruptObject, StoreError
from ..keys import Namespace
from .index import ObjectInfo
from .slots import PrioritySlots
from .tiers import Tier, read_footer

log = logging.getLogger("sglang_objectcache")


class DiskTier(Tier):
    kind = "disk"

    def __init__(self, name: str, store, ns: Namespace, capacity: int):  # store: stores.disk.DiskStore
        # Local files: plenty of parallelism, and no network to protect.
        super().__init__(name, store, ns, PrioritySlots(64, 32))
        self.capacity = capacity
        self.budget = store.budget
        self.budget.on_evict = self._evicted  # called on the writing thread

    def _evicted(self, name: str) -> None:
        self.index.remove(name)
        self.headers.drop(name)

    async def start(self) -> None:
        found = await self.store.list(self.ns.root + "d/")
        dropped = 0
        for name, size, _ in found:
            try:
                h = await read_footer(self.store, name, size)
                info = ObjectInfo.from_header(name, h)
                if info.size != size:
                    raise CorruptObject(f"{size} of {info.size} bytes")
            except (CorruptObject, StoreError) as e:
                log.warning("disk tier: dropping unreadable %s (%s)", name, e)
                await self.store.delete([name])
                dropped += 1
                continue
            self.index.add(info)
        await asyncio.to_thread(self.budget.check)  # left-over temporary files go, a smaller capacity holds
        if found:
            log.info("disk tier %s: %d objects of this namespace, %.1f MiB in the directory; %d dropped, %d "
                     "temporary files removed", self.name, self.index.n_objects, self.budget.used / 2**20, dropped,
                     self.budget.swept)

    def used(self, name: str) -> None:
        """A read of the object completed, whole or in ranges: it leaves last."""
        self.store.touch(name)

    async def discard(self, name: str) -> None:
        """Remove a bad local copy."""
        self.index.remove(name)
        await self.store.delete([name])

    async def forget(self, name: str) -> None:
        """A local copy gone behind our back (another process evicted it): nothing more to do."""
        self.index.remove(name)

    def stats(self) -> dict:
        return {**super().stats(), "used_bytes": self.budget.used, "capacity_bytes": self.capacity,
                "swept_temporary_files": self.budget.swept}
