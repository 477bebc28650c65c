"""The write path: pages into objects, objects into tiers.

`put` cuts the pages that the last (shared, durable) tier lacks into runs of up to
`pages_per_object`, encodes each run as one object on the calling thread (SGLang's backup thread)
and writes it on the loop, with a bound on the bytes in flight and a deadline. Write-through
writes every tier before a page counts as stored; write-back counts it once the first tier has it
and owes its copy below (`write_back.py`: bounded, retried, drained at shutdown). Promotion copies an object read from a lower tier into the
first one, also in the background.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import time
from typing import Sequence

from ..buffer_pool import BufferPool
from ..config import ObjectCacheConfig
from ..errors import StoreError
from ..format import SegmentFn, decode_header, encode
from ..keys import Fingerprint, Namespace
from .events import RateLimitedLog, Stats
from .index import ObjectInfo
from .runtime import Background, Runtime
from .tiers import Tier
from .write_back import WriteBack

# Bytes of encoded objects a put keeps in flight before it waits for PUTs to finish.
PUT_INFLIGHT_BYTES = 512 << 20
# Promotions at most in the background at once (beyond it, an object read from below stays there).
MAX_BACKGROUND = 64
# Encoded-object buffers held between puts (256 MiB at 8 pages of a 32-layer, 8-head model). obstore
# sends a buffer without copying it, so one goes back to the pool only once every tier has its
# object; one whose write failed, timed out or was cancelled is dropped (a transfer may still read it).
KEEP_BUFFERS = 4


def runs_to_write(stored: Sequence[bool], per_object: int) -> list[tuple[int, int]]:
    """[start, end) of the objects to write: runs of pages not stored, at most `per_object` long."""
    runs, i = [], 0
    while i < len(stored):
        if stored[i]:
            i += 1
            continue
        j = i
        while j < len(stored) and not stored[j] and j - i < per_object:
            j += 1
        runs.append((i, j))
        i = j
    return runs


class Writer:
    def __init__(self, cfg: ObjectCacheConfig, fp: Fingerprint, ns: Namespace, tiers: list[Tier],
                 runtime: Runtime, background: Background, stats: Stats, warn: RateLimitedLog,
                 mac_key: bytes | None = None):
        self.cfg = cfg
        self.fp = fp
        self.ns = ns
        self.tiers = tiers
        self.runtime = runtime
        self.background = background
        self.stats = stats
        self._warn = warn
        self.mac_key = mac_key  # keyed integrity: every footer carries a MAC under it
        self.write_back = (WriteBack(tiers, cfg.write_back_buffer, stats)
                           if cfg.write_policy == "write_back" and len(tiers) > 1 else None)
        # write-back keeps an object's bytes for the copies it owes below: those are never reused
        self.buffers = BufferPool(KEEP_BUFFERS) if self.write_back is None else None

    def put(self, keys: Sequence[str], segments: SegmentFn) -> list[bool]:
        """Store pages; one bool per key. Keys already stored are not written again."""
        deadline = time.monotonic() + self.cfg.timeout
        # Skip pages the last (shared, durable) tier already has; upper tiers fill on reads.
        ok = [k in self.tiers[-1].index for k in keys]
        futs: dict[cf.Future, tuple[int, int]] = {}
        bufs: dict[cf.Future, memoryview] = {}
        inflight: collections.deque[tuple[cf.Future, int]] = collections.deque()
        held = 0
        for a, b in runs_to_write(ok, self.cfg.pages_per_object):
            if time.monotonic() > deadline:
                break
            name = self.ns.data_name(keys[a], b - a)
            try:
                data = encode(self.fp.digest, keys[a:b], self.fp.n_layers, self.fp.piece_bytes, segments, first=a,
                              mac_key=self.mac_key, alloc=self._alloc if self.buffers else None)
            except ValueError as e:
                self._warn.warn("encode", "objectcache: cannot encode pages: %s", e)
                continue
            info = ObjectInfo.from_header(name, decode_header(data))
            fut = self.runtime.submit(self._write_object(info, data))
            futs[fut] = (a, b)
            bufs[fut] = data
            inflight.append((fut, len(data)))
            held += len(data)
            while held > PUT_INFLIGHT_BYTES and inflight:  # bound memory: wait for the oldest
                oldest, size = inflight.popleft()
                cf.wait([oldest], timeout=max(0.0, deadline - time.monotonic()))
                held -= size
                if oldest.done() and not oldest.cancelled() and oldest.exception() is None:
                    self._reuse(bufs, oldest)  # the next object of this put can take it
        for fut in self._drain(futs, deadline):
            a, b = futs[fut]
            ok[a:b] = [True] * (b - a)
            self._reuse(bufs, fut)
        written = sum(b - a for a, b in futs.values() if ok[a])
        self.stats.add(put_calls=1, put_pages=len(keys), put_written=written,
                       write_bytes=written * self.fp.piece_bytes * self.fp.n_layers)
        return ok

    def _alloc(self, size: int) -> memoryview:
        return memoryview(self.buffers.take(size))[:size]

    def _reuse(self, bufs: dict, fut: cf.Future) -> None:
        """`fut`'s write succeeded in every tier: nothing reads its buffer any more. Once only."""
        view = bufs.pop(fut, None)
        if view is not None and self.buffers is not None:
            self.buffers.give(view.obj)  # the pool's array under the object's view

    def _drain(self, futs: dict[cf.Future, tuple[int, int]], deadline: float) -> list[cf.Future]:
        """Wait for the writes of one put until the deadline; those that succeeded."""
        stored, pending = [], set(futs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                for f in pending:
                    f.cancel()
                self.stats.add(timeouts=len(pending))
                self._warn.warn("timeout", "objectcache: %d writes still pending after the %.1fs "
                                "deadline; their pages are not stored", len(pending), self.cfg.timeout)
                break
            done, pending = cf.wait(pending, timeout=left, return_when=cf.FIRST_COMPLETED)
            for f in done:
                try:
                    f.result()
                except (StoreError, asyncio.TimeoutError, cf.CancelledError) as e:
                    self.stats.add(errors=1, **{f"write_errors_{type(e).__name__}": 1})
                    self._warn.warn(f"io:{type(e).__name__}", "objectcache: %s; pages not stored", e)
                    continue
                except Exception as e:  # noqa: BLE001 - never let an I/O error reach SGLang
                    self.stats.add(errors=1, **{f"write_errors_{type(e).__name__}": 1})
                    self._warn.warn("io:other", "objectcache: unexpected %s: %s", type(e).__name__, e)
                    continue
                stored.append(f)
        return stored

    async def _write_object(self, info: ObjectInfo, data) -> None:
        if self.write_back is None:
            await asyncio.gather(*(t.write(info, data) for t in self.tiers))
            return
        await self.write_back.wait_for_room()  # backpressure: at most MAX_QUEUED copies owed
        stored = await self.tiers[0].write(info, data)
        self.write_back.submit(stored, data)

    # ---- promotion -----------------------------------------------------------------------

    def may_promote(self, info: ObjectInfo) -> bool:
        """Copy objects found in a lower tier into the first tier (bounded background work)."""
        return not self.tiers[0].index.has_object(info.name) and len(self.background) <= MAX_BACKGROUND

    def promote(self, info: ObjectInfo, data) -> None:
        """An object read whole (and verified) from a lower tier: write it into the first tier, in
        the background, indexed by its footer's keys."""
        info = ObjectInfo.from_header(info.name, decode_header(data))
        self.background.spawn(self.tiers[0].write(info, data), "promote")
        self.stats.add(promotions=1)
