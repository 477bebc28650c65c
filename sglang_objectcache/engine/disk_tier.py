"""The disk tier: a local directory with a byte budget, least recently used objects leaving first.

Its index is rebuilt from the directory at start: each object's footer says what it holds, and
unreadable or truncated files are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from ..errors import CorruptObject, StoreError
from ..keys import Namespace
from ..stores.base import ObjectStore
from .index import ObjectInfo
from .slots import PrioritySlots
from .tiers import Tier, read_footer

log = logging.getLogger("sglang_objectcache")


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
        for name, size, _ in found:
            try:
                h = await read_footer(self.store, name, size)
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

    def used(self, name: str) -> None:
        """A read of the object completed, whole or in ranges: it leaves last."""
        if name in self._lru:
            self._lru.move_to_end(name)

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

    async def write(self, info: ObjectInfo, data) -> ObjectInfo | None:
        if info.size > self.capacity:
            raise StoreError(f"object of {info.size} bytes exceeds the disk tier capacity")
        if info.name in self._lru:
            self._lru.move_to_end(info.name)
            return info
        await self._reserve(info.name, info.size)
        try:
            return await super().write(info, data)
        except BaseException:
            if self._lru.pop(info.name, None) is not None:
                self.used -= info.size
            raise

    async def discard(self, name: str) -> None:
        """Remove a bad local copy (on the loop thread, which owns the LRU)."""
        self.index.remove(name)
        size = self._lru.pop(name, None)
        if size is not None:
            self.used -= size
        await self.store.delete([name])

    async def forget(self, name: str) -> None:
        """A local copy gone behind our back: its budget is free again."""
        await self.discard(name)

    async def clear(self) -> int:
        n = await super().clear()
        self._lru.clear()
        self.used = 0
        return n

    def stats(self) -> dict:
        return {**super().stats(), "used_bytes": self.used, "capacity_bytes": self.capacity}
