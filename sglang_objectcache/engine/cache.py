"""The engine's synchronous face: exists / get / put of pages, over the tiers.

Called from SGLang's prefetch, IO and backup threads (never its scheduler thread for I/O). CPU
work (copying pages in and out, checksums) runs on the calling thread, overlapped with the
network requests that run on the runtime loop; every call has a deadline, after which what has
not arrived is a miss.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import functools
import logging
import os
import threading
import time
from typing import Sequence

from .. import native
from ..config import DiskTierConfig, ObjectCacheConfig, S3TierConfig
from ..format import SegmentFn, decode_header, encode
from ..keys import Fingerprint, Namespace
from ..stores.base import StoreError
from .index import ObjectInfo
from .fetch import Fetch
from .policy import POLICIES
from .scheduler import DirectRead, ReadScheduler
from .plan import PlannedObject, Read, plan_fetch
from .runtime import Runtime
from . import switch
from .tiers import DiskTier, S3Tier, Tier

log = logging.getLogger("sglang_objectcache")

# Bytes of encoded objects a put keeps in flight before it waits for PUTs to finish.
PUT_INFLIGHT_BYTES = 512 << 20
# Bytes of write-back data held in memory for lower tiers; past it, lower tiers re-read the
# object from the first tier instead.
WRITE_BACK_BUFFER_BYTES = 1 << 30


class StartupError(RuntimeError):
    """A tier cannot be used: unreachable server, missing bucket, rejected credentials."""


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.c: collections.Counter[str] = collections.Counter()

    def add(self, **kw: int) -> None:
        with self._lock:
            self.c.update(kw)


class _RateLimitedLog:
    """First occurrence of each kind at WARNING, then a count every `every` seconds."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._suppressed[kind] += 1
                return
            self._last[kind] = now
            n = self._suppressed.pop(kind, 0)
        log.warning(msg + (f" (+{n} similar)" if n else ""), *args)


def build_tiers(cfg: ObjectCacheConfig, ns: Namespace) -> list[Tier]:
    from ..stores.factory import build_range_reader, build_store

    tiers: list[Tier] = []
    for i, t in enumerate(cfg.tiers):
        store = build_store(t, f"tiers[{i}]")
        reader = build_range_reader(t, f"tiers[{i}]") if isinstance(t, S3TierConfig) else None
        if isinstance(t, DiskTierConfig):
            tiers.append(DiskTier(t.name, store, ns, t.capacity))
        else:
            assert isinstance(t, S3TierConfig)
            tiers.append(S3Tier(t.name, store, ns, max_connections=t.max_connections,
                                max_write_connections=t.max_write_connections,
                                refresh_interval=t.index_refresh_interval,
                                flush_interval=t.manifest_flush_interval,
                                startup_timeout=max(cfg.timeout, 3 * t.request_timeout),
                                scheduler=ReadScheduler(POLICIES[cfg.fetch_policy], cfg.bandwidth,
                                                        t.max_connections),
                                range_reader=reader, staging_bytes=cfg.read_range_bytes,
                                receive_pieces=t.native_receive == "pieces"))
    return tiers


class ObjectCache:
    def __init__(self, cfg: ObjectCacheConfig, fp: Fingerprint):
        self.cfg = cfg
        self.fp = fp
        self.digest = fp.digest
        s3 = next((t for t in cfg.tiers if isinstance(t, S3TierConfig)), None)
        self.ns = Namespace(s3.prefix if s3 else "", cfg.namespace or fp.model, self.digest)
        self.runtime = Runtime()
        self.stats = _Stats()
        self._warn = _RateLimitedLog()
        self._wb_bytes = 0
        self._wb_lock = threading.Lock()
        self._background: set[cf.Future] = set()
        # Verifying and copying arrived ranges into SGLang's buffers: one native call per range
        # that leaves the GIL (native/), so these threads copy in parallel.
        self._copiers = cf.ThreadPoolExecutor(max_workers=cfg.copy_threads or min(8, os.cpu_count() or 1),
                                              thread_name_prefix="objectcache-copy")
        self._closed = False
        try:
            self.tiers = build_tiers(cfg, self.ns)
            for i, tier in enumerate(self.tiers):
                self.runtime.run(self._start_tier(i, tier), timeout=None)
        except BaseException:
            for tier in getattr(self, "tiers", []):
                try:
                    self.runtime.run(tier.stop(), timeout=5.0)
                except Exception:  # noqa: BLE001 - already failing; report the first error
                    pass
            self.runtime.close()
            self._copiers.shutdown(wait=False)
            raise
        # build or load the native copy helper now, not on the first read
        log.info("objectcache ready: %s; namespace %s; tiers %s; copies %s; GIL switch interval while "
                 "reading: %s", fp.describe(), self.ns.root, ", ".join(t.name for t in self.tiers),
                 native.status(), f"{cfg.switch_interval * 1e3:.2g} ms" if cfg.switch_interval else "Python's")

    async def _start_tier(self, i: int, tier: Tier) -> None:
        from ..stores.factory import probe

        await probe(tier.store, self.cfg.tiers[i], f"tiers[{i}]", self.ns.root)
        try:
            await tier.start()
        except (StoreError, asyncio.TimeoutError) as e:
            raise StartupError(f"tiers[{i}] ({tier.name}): cannot build the index: {e}") from None

    # ---- queries -------------------------------------------------------------------------

    def exists(self, keys: Sequence[str]) -> int:
        """Length of the leading run of keys present in some tier. No request is made."""
        n = 0
        for key in keys:
            if not any(key in t.index for t in self.tiers):
                break
            n += 1
        self.stats.add(exists_calls=1, exists_pages=len(keys), exists_hits=n)
        if n < len(keys):
            for t in self.tiers:
                if isinstance(t, S3Tier):
                    t.nudge()
        return n

    def _locate(self, key: str) -> tuple[Tier, ObjectInfo, int] | None:
        for t in self.tiers:
            hit = t.index.lookup(key)
            if hit is not None:
                return t, hit[0], hit[1]
        return None

    # ---- reads ---------------------------------------------------------------------------

    def fetch(self, keys: Sequence[str], segments: SegmentFn, t_layer: float = 0.0, *,
              streamed: bool = False) -> Fetch:
        """Start fetching pages in layer order and return at once: `.readiness.wait(layer)` blocks
        until that layer of every found page is in place and verified, `.wait(timeout)` gives one
        bool per key. Stops at the first page not stored. `t_layer`, the forward pass's compute
        time per layer for this request when known, lets the scheduler share bandwidth by need.
        `streamed`: the caller uses each layer as it lands (SGLang's layer-wise path), so the
        first-layer hold applies; a caller that waits for the whole fetch gains nothing from it."""
        objects: list[PlannedObject] = []
        for i, key in enumerate(keys):
            loc = self._locate(key)
            if loc is None:
                break
            tier, info, slot = loc
            o = objects[-1] if objects else None
            if o and o.tier is tier and o.info.name == info.name and o.slots[-1] + 1 == slot:
                o.slots.append(slot)
            else:
                objects.append(PlannedObject(tier, info, i, [slot], info.name.startswith(self.ns.root)))
        # S3 reads go through the tier's scheduler (disk reads need no sharing)
        sched = {id(t): t.scheduler for t in self.tiers if isinstance(t, S3Tier)}
        waves = self.cfg.read_waves * max((s.max_inflight for s in sched.values()), default=0)
        plan = plan_fetch(objects, self.fp.n_layers, self.cfg.read_range_bytes, self.cfg.first_range_layers, waves)
        rids: dict[int, int] = {}  # tier -> its scheduler's id for this request
        positions: dict[int, int] = {}  # read -> its place in its tier's registered sequence

        def layer0() -> bool:
            """For the scheduler's first-layer hold: layer 0 is in place, or will not be."""
            return fetch.readiness.is_ready(0) or fetch.readiness.failed is not None

        def register() -> None:
            """On the loop, just before the reads start: no round trip from the calling thread."""
            for tier_id, s in sched.items():
                mine = [r for r in plan.reads if id(plan.objects[r.obj].tier) == tier_id]
                if mine:
                    rids[tier_id] = s.register([(r.nbytes, r.l0, r.l1) for r in mine], self.fp.n_layers, t_layer,
                                               hold=self.cfg.first_layer_hold if streamed else 0.0,
                                               layer0=layer0)
                    positions.update((id(r), n) for n, r in enumerate(mine))

        def submit(o: PlannedObject, r: Read):
            """The coroutine of one read (run on the loop), through the tier's scheduler for S3."""
            whole = r.start == 0 and r.end == o.info.size
            def factory():
                return o.tier.read(o.info) if whole else o.tier.read_range(o.info.name, r.start, r.end)
            tid = id(o.tier)
            if tid in rids:
                return sched[tid].read(rids[tid], positions[id(r)], factory)
            return factory()

        loop = self.runtime.loop

        def direct(o: PlannedObject, r: Read, run, skip) -> bool:
            """Where the tier has the native reader: the read goes to a pull thread at its grant,
            which receives, verifies and copies it there (`run(source, end)`), and only its end
            comes back to the loop, to free the grant."""
            if o.tier.range_reader is None or not o.trusted:
                return False
            source = o.tier.source(o.info.name, r.start, r.end)
            tid = id(o.tier)
            if tid not in rids:
                o.tier.start_pull(functools.partial(run, source, lambda landed: None), skip)
                return True
            s, rid, index = sched[tid], rids[tid], positions[id(r)]

            def end(landed: bool) -> None:
                try:
                    loop.call_soon_threadsafe(s.finished, rid, index, landed)
                except RuntimeError:  # the loop is closed: so is the scheduler
                    pass

            def never_ran() -> None:  # granted, then the pull threads shut down
                skip()
                end(False)
            s.submit(rid, index, DirectRead(
                lambda: o.tier.start_pull(functools.partial(run, source, end), never_ran), skip))
            return True

        def drop() -> None:
            for tid, rid in rids.items():
                sched[tid].drop_waiting(rid)

        def promote_buffer(o: PlannedObject) -> bytearray | None:
            if o.tier is not self.tiers[0] and self._may_promote(o.info):
                return bytearray(o.info.size)
            return None

        interval = self.cfg.switch_interval

        def finished() -> None:  # called once, by the Fetch
            switch.leave(interval)
            for tid, rid in rids.items():
                try:
                    self.runtime.loop.call_soon_threadsafe(sched[tid].close_request, rid)
                except RuntimeError:  # the loop is closed: so is the scheduler
                    pass

        switch.enter(interval)  # until `finished`: the GIL hand-overs of the reads are short
        try:
            fetch = Fetch(plan, len(keys), segments, digest=self.digest, verify=self.cfg.verify_checksums,
                          submit=submit, loop=self.runtime.loop, copiers=self._copiers,
                          promote_buffer=promote_buffer, on_event=self._on_fetch_event, on_finish=finished,
                          prepare=register, direct=direct, drop=drop)
        except BaseException:  # it never called `finished`: that is its last step
            switch.leave(interval)
            raise
        return fetch.start()

    def get(self, keys: Sequence[str], segments: SegmentFn) -> list[bool]:
        """Fill pages from storage; one bool per key, within the configured deadline."""
        return self.collect(self.fetch(keys, segments))

    def collect(self, fetch: Fetch) -> list[bool]:
        """Wait for a started fetch within the configured deadline and count it as one read call:
        `get` is fetch plus collect; a caller that needs the layers as they land uses the two."""
        ok = fetch.wait(self.cfg.timeout)
        hits = sum(ok)
        if log.isEnabledFor(logging.DEBUG) and fetch.plan.reads:
            took = time.monotonic() - fetch.started
            first = fetch.readiness.ready_at[0]
            log.debug("objectcache: read %d of %d pages, %.0f MiB in %d requests, %.1f ms (%.2f GiB/s); "
                      "layer 0 ready after %s ms", hits, len(ok), fetch.plan.nbytes / 2**20,
                      len(fetch.plan.reads), took * 1e3, fetch.plan.nbytes / max(took, 1e-9) / 2**30,
                      f"{(first - fetch.started) * 1e3:.1f}" if first is not None else "-")
        self.stats.add(get_calls=1, get_pages=len(ok), get_hits=hits,
                       read_bytes=hits * self.fp.piece_bytes * self.fp.n_layers)
        return ok

    def _on_fetch_event(self, kind: str, o: PlannedObject | None, detail) -> None:
        if kind == "io_error":
            self.stats.add(errors=1)
            self._warn.warn(f"io:{type(detail).__name__}", "objectcache: %s; pages are misses", detail)
        elif kind == "timeout":
            self.stats.add(timeouts=detail)
            self._warn.warn("timeout", "objectcache: %d reads still pending after the %.1fs deadline; "
                            "their pages are misses", detail, self.cfg.timeout)
        elif kind == "corrupt":
            self.stats.add(corrupt=1)
            self._warn.warn("corrupt", "objectcache: %s in %s is corrupt (%s); treating as a miss",
                            o.info.name, o.tier.name, detail)
            o.tier.index.ban(o.info.name)  # thread-safe, and at once: the next call must not use it
            if isinstance(o.tier, DiskTier):  # our own local copy; S3 objects are never deleted here
                self.runtime.submit(o.tier.drop(o.info.name))
        elif kind == "copy_error":
            self._warn.warn("deliver", "objectcache: cannot copy %s into the pool: %s", o.info.name, detail)
        elif kind == "promote":
            self._spawn(self.tiers[0].write(o.info, detail), "promote")
            self.stats.add(promotions=1)

    def _drain(self, futs: dict[cf.Future, object], deadline: float, handle) -> None:
        """Wait for the writes of one put() until the deadline; `handle` takes each success."""
        pending = set(futs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                for f in pending:
                    f.cancel()
                self.stats.add(timeouts=len(pending))
                self._warn.warn("timeout", "objectcache: %d writes still pending after the %.1fs "
                                "deadline; their pages are not stored", len(pending), self.cfg.timeout)
                return
            done, pending = cf.wait(pending, timeout=left, return_when=cf.FIRST_COMPLETED)
            for f in done:
                item = futs[f]
                try:
                    result = f.result()
                except (StoreError, asyncio.TimeoutError, cf.CancelledError) as e:
                    self.stats.add(errors=1)
                    self._warn.warn(f"io:{type(e).__name__}", "objectcache: %s; pages not stored", e)
                    continue
                except Exception as e:  # noqa: BLE001 - never let an I/O error reach SGLang
                    self.stats.add(errors=1)
                    self._warn.warn("io:other", "objectcache: unexpected %s: %s", type(e).__name__, e)
                    continue
                handle(item, result)

    def _may_promote(self, info: ObjectInfo) -> bool:
        """Copy objects found in a lower tier into the first tier (bounded background work)."""
        return not self.tiers[0].index.has_object(info.name) and len(self._background) <= 64

    # ---- writes --------------------------------------------------------------------------

    def put(self, keys: Sequence[str], segments: SegmentFn) -> list[bool]:
        """Store pages; one bool per key. Keys already stored are not written again."""
        deadline = time.monotonic() + self.cfg.timeout
        # Skip pages the last (shared, durable) tier already has; upper tiers fill on reads.
        ok = [k in self.tiers[-1].index for k in keys]
        runs: list[tuple[int, int]] = []  # [start, end) of objects to write
        i = 0
        per = self.cfg.pages_per_object
        while i < len(keys):
            if ok[i]:
                i += 1
                continue
            j = i
            while j < len(keys) and not ok[j] and j - i < per:
                j += 1
            runs.append((i, j))
            i = j
        futs: dict[cf.Future, tuple[int, int]] = {}
        inflight: collections.deque[tuple[cf.Future, int]] = collections.deque()
        held = 0
        for a, b in runs:
            if time.monotonic() > deadline:
                break
            name = self.ns.data_name(keys[a], b - a)
            try:
                data = encode(self.digest, keys[a:b], self.fp.n_layers, self.fp.piece_bytes, segments, first=a)
            except ValueError as e:
                self._warn.warn("encode", "objectcache: cannot encode pages: %s", e)
                continue
            info = ObjectInfo.from_header(name, decode_header(data))
            fut = self.runtime.submit(self._write_object(info, data))
            futs[fut] = (a, b)
            inflight.append((fut, len(data)))
            held += len(data)
            while held > PUT_INFLIGHT_BYTES and inflight:  # bound memory: wait for the oldest
                oldest, size = inflight.popleft()
                cf.wait([oldest], timeout=max(0.0, deadline - time.monotonic()))
                held -= size

        def mark(span: tuple[int, int], _result) -> None:
            for k in range(*span):
                ok[k] = True

        self._drain(futs, deadline, mark)
        written = sum(b - a for f, (a, b) in futs.items() if ok[a])
        self.stats.add(put_calls=1, put_pages=len(keys), put_written=written,
                       write_bytes=written * self.fp.piece_bytes * self.fp.n_layers)
        return ok

    async def _write_object(self, info: ObjectInfo, data) -> None:
        if self.cfg.write_policy == "write_through" or len(self.tiers) == 1:
            await asyncio.gather(*(t.write(info, data) for t in self.tiers))
            return
        await self.tiers[0].write(info, data)
        keep = False
        with self._wb_lock:
            if self._wb_bytes + len(data) <= WRITE_BACK_BUFFER_BYTES:
                self._wb_bytes += len(data)
                keep = True
        self._spawn(self._write_lower(info, data if keep else None), "write-back")

    async def _write_lower(self, info: ObjectInfo, data) -> None:
        held = data is not None
        try:
            if data is None:
                if not self.tiers[0].index.has_object(info.name):
                    return  # evicted before its turn; nothing to copy
                data = await self.tiers[0].read(info)
            for t in self.tiers[1:]:
                await t.write(info, data)
        finally:
            if held:
                with self._wb_lock:
                    self._wb_bytes -= len(data)

    def _spawn(self, coro, what: str) -> None:
        fut = self.runtime.submit(coro)
        self._background.add(fut)

        def done(f: cf.Future) -> None:
            self._background.discard(f)
            if not f.cancelled() and f.exception() is not None:
                self.stats.add(background_errors=1)
                self._warn.warn(f"bg:{what}", "objectcache: %s failed: %s", what, f.exception())

        fut.add_done_callback(done)

    # ---- admin ---------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Wait for background writes and publish pending manifests (tests, shutdown)."""
        end = time.monotonic() + (timeout if timeout is not None else self.cfg.timeout)
        while self._background and time.monotonic() < end:
            cf.wait(list(self._background), timeout=max(0.0, end - time.monotonic()))
        for t in self.tiers:
            if isinstance(t, S3Tier):
                self.runtime.run(t.flush(), timeout=max(0.1, end - time.monotonic()))

    def clear(self) -> cf.Future:
        """Forget every page now; delete this namespace's objects in the background."""
        for t in self.tiers:
            t.index.clear()

        async def _clear() -> int:
            return sum(await asyncio.gather(*(t.clear() for t in self.tiers)))

        fut = self.runtime.submit(_clear())
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)
        return fut

    def snapshot(self) -> dict:
        with self.stats._lock:
            counters = dict(self.stats.c)
        return {"counters": counters, "tiers": {t.name: t.stats() for t in self.tiers},
                "namespace": self.ns.root}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout=min(self.cfg.timeout, 10.0))
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        for t in self.tiers:
            try:
                self.runtime.run(t.stop(), timeout=5.0)
            except Exception:  # noqa: BLE001
                pass
        self.runtime.close()
        self._copiers.shutdown(wait=True)
