"""One request's read, start to end: plan, grant, receive, verify, collect.

1. Plan (`ReadSession.__init__`): the leading run of keys found in some tier becomes objects and
   layer-ordered range reads (`plan.py`), each object with its checks (`reader.ObjectRead`).
2. Grant (`_spawn`, on the loop): S3 reads register with their tier's scheduler, which decides
   when each one goes under the bandwidth budget (`scheduler.py`); disk reads go at once.
3. Receive: where the tier has a range reader (the native reader), a read runs on one of its pull
   threads from its grant to its end (`_pull`) and is checked and copied there, piece by piece as
   it arrives; elsewhere the store's bytes come back to the loop as a task's result (`_fetched`)
   and a copy thread takes them (`_copy`).
4. Verify and copy: every piece against its object's footer, into the caller's pages
   (`reader.ObjectRead`); each layer counts as ready once all its pieces are in (`readiness.py`).
   A footer the tier does not hold is asked for with the data (`_spawn`), never before it.
5. Collect (`wait`): one bool per key once every read has landed or failed; after the deadline
   or `cancel()` the rest is a miss, and `wait` returns only once no copy into the caller's
   buffers is running.

Nothing here blocks the caller: `start()` returns at once (one hand-over to the loop for all
reads).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .. import native
from ..errors import CorruptObject, StoreError
from ..format import SegmentFn, empty_buffer, encode_meta
from ..stores.base import CLOSED, SHORT
from . import switch
from .plan import PlannedObject, Read, plan_fetch
from .readiness import LayerReadiness
from .reader import ObjectRead
from .scheduler import DirectRead
from .tiers import Tier

log = logging.getLogger("sglang_objectcache")

class CancelledError(Exception):
    """A read session was cancelled while a range waited for its footer."""


FOOTER_MOMENT = 0.02  # seconds a pulled range waits for a footer still on its way before going whole


DELIVERED = object()  # a pulled read's outcome: its bytes are in place (or it failed and said so)
SKIPPED = object()  # a pulled read that never started: the session was cancelled first


class _NoGate:
    """Where no read goes in piece by piece: nothing to close."""

    def close(self) -> None:
        pass


_NO_GATE = _NoGate()


@dataclass
class ReadContext:
    """What every read session of one cache shares."""

    tiers: list[Tier]
    root: str  # the namespace: objects outside it are never read
    n_layers: int
    digest: str
    range_bytes: int
    verify: bool
    first_layer_hold: float  # for streamed sessions only (scheduler.py)
    switch_interval: float  # switch.py
    loop: asyncio.AbstractEventLoop
    copiers: cf.Executor  # threads that verify and copy ranges that came back to the loop
    may_promote: Callable  # (ObjectInfo) -> bool: copy an object read from a lower tier upward
    on_event: Callable  # (kind, PlannedObject | None, detail): stats, logs, bans, promotion
    mac_key: bytes | None = None  # keyed integrity: footers must carry a MAC under it
    meters: dict | None = None  # Tier -> decide.ReadMeter: the read rate each tier gives (load or recompute)


def locate(tiers: Sequence[Tier], root: str, keys: Sequence[str]) -> list[PlannedObject]:
    """The leading run of keys found in some tier that is up, as spans of consecutive slots of one object.
    An index entry outside the namespace `root` (another model, dtype or geometry) ends the run:
    a footer's checksums vouch for bytes, not for whose bytes they are."""
    objects: list[PlannedObject] = []
    tiers = [t for t in tiers if t.health.up()]
    for i, key in enumerate(keys):
        hit = next(((t, found) for t in tiers if (found := t.index.lookup(key)) is not None), None)
        if hit is None or not hit[1][0].name.startswith(root):
            break
        tier, (info, slot) = hit
        o = objects[-1] if objects else None
        if o and o.tier is tier and o.info.name == info.name and o.slots[-1] + 1 == slot:
            o.slots.append(slot)
        else:
            objects.append(PlannedObject(tier, info, i, [slot]))
    return objects


class ReadSession:
    def __init__(self, ctx: ReadContext, keys: Sequence[str], segments: SegmentFn, t_layer: float = 0.0, *,
                 streamed: bool = False):
        self.ctx = ctx
        self.segments = segments
        self.t_layer = t_layer
        self.hold = ctx.first_layer_hold if streamed else 0.0
        self.plan = plan_fetch(locate(ctx.tiers, ctx.root, keys), ctx.n_layers, ctx.range_bytes)
        self.ok = [False] * len(keys)
        self.readiness = LayerReadiness(self.plan.n_layers, self.plan.pending_per_layer())
        self.started = time.monotonic()
        per_object = [0] * len(self.plan.objects)
        for r in self.plan.reads:
            per_object[r.obj] += 1
        self._jobs = [ObjectRead(o.info, o.slots, o.first, per_object[i], ctx.digest, ctx.verify,
                                 keys[o.first:o.first + len(o.slots)], o.tier.headers.get(o.info.name, o.info.digest),
                                 empty_buffer(o.info.size) if self._promotes(o) else None, mac_key=ctx.mac_key)
                      for i, o in enumerate(self.plan.objects)]
        whole = {r.obj for r in self.plan.reads if r.start == 0 and r.end == self.plan.objects[r.obj].info.size}
        # objects whose footer must be asked for: not held, and not read whole (a whole read carries it)
        self._footers = [i for i, j in enumerate(self._jobs) if j.header is None and i not in whole]
        self._footer_asked = set(self._footers)
        self._rids: dict[Tier, int] = {}  # tier -> its scheduler's id for this request (loop only)
        self._positions: dict[int, int] = {}  # id(read) -> its place in its tier's registered reads
        self._lock = threading.Lock()
        self._left = len(self.plan.reads)
        self._settled: set[int] = set()  # id() of reads counted done: each counts once
        self._copying = 0  # pull threads copying into the caller's buffers: not finished while any is
        self._signalled = False
        self._finished = threading.Event()
        self._cancelled = False
        pulls = any(o.tier.range_reader is not None for o in self.plan.objects)
        self._gate = native.CopyGate() if pulls and native.http_get_pieces() else _NO_GATE
        self._handed: list[Read] = []  # reads given to pull threads (loop thread only)
        # reads not yet landed (loop thread only); a landed read leaves at once, so that its bytes
        # are freed as soon as they are copied (a task keeps its result)
        self._futs: set[asyncio.Task] = set()
        self._metered = self._meter_start()
        switch.enter(ctx.switch_interval)  # until `_signal`: the GIL hand-overs of the reads are short
        if not self._left:
            self._signalled = True
            self._on_finish()
            self._finished.set()

    def _meter_start(self) -> list:
        """Tell each tier's read meter the bytes this session asks of it."""
        if not self.ctx.meters or not self.plan.reads:
            return []
        per: dict = {}
        for r in self.plan.reads:
            tier = self.plan.objects[r.obj].tier
            per[tier] = per.get(tier, 0) + r.nbytes
        out = []
        for tier, nbytes in per.items():
            meter = self.ctx.meters.get(tier)
            if meter is not None:
                meter.started(id(self), nbytes)
                out.append((meter, tier, nbytes))
        return out

    def _meter_end(self) -> None:
        """Each tier's meter learns what arrived of what it was asked (failed pages count their time)."""
        for meter, tier, nbytes in self._metered:
            mine = [o for o in self.plan.objects if o.tier is tier]
            asked = sum(len(o.slots) for o in mine)
            got = sum(sum(self.ok[o.first:o.first + len(o.slots)]) for o in mine)
            meter.ended(id(self), nbytes * got // max(asked, 1))

    def _promotes(self, o: PlannedObject) -> bool:
        return o.tier is not self.ctx.tiers[0] and self.ctx.may_promote(o.info)

    # ---- grant ---------------------------------------------------------------------------

    def start(self) -> "ReadSession":
        """Hand every read to the loop in one call: one cross-thread wake-up per session, not one
        per read (each costs the caller a GIL hand-over, slow next to SGLang's busy threads)."""
        if self._left:
            try:
                self.ctx.loop.call_soon_threadsafe(self._spawn)
            except RuntimeError:  # the loop is closed: the cache is closing
                for read in self.plan.reads:
                    self._fail(read, "closing")
        return self

    def _spawn(self) -> None:
        """On the loop: ask for the footers not held, register with the schedulers, then start or
        queue every read. A footer request is small and goes first, beside the data, not before it."""
        for i in self._footers:
            o = self.plan.objects[i]
            task = self.ctx.loop.create_task(o.tier.header(o.info))
            self._futs.add(task)
            task.add_done_callback(functools.partial(self._footer, i))
        try:
            self._register()
        except Exception as e:  # noqa: BLE001 - a failed registration fails the session, not the loop
            self._cancelled = True
            self.readiness.fail(f"cannot start: {e}")
        for read in self.plan.reads:
            if self._cancelled:  # cancelled before the reads were started
                self._fail(read, "cancelled")
                continue
            o = self.plan.objects[read.obj]
            if o.tier.range_reader is not None:
                self._handed.append(read)
                self._queue_pull(o, read)
                continue
            task = self.ctx.loop.create_task(self._read(o, read))
            self._futs.add(task)
            task.add_done_callback(functools.partial(self._fetched, read))

    def _register(self) -> None:
        """Each scheduled tier's share of the plan, in plan order (with the first-layer hold)."""
        for tier in dict.fromkeys(o.tier for o in self.plan.objects if o.tier.scheduler is not None):
            mine = [r for r in self.plan.reads if self.plan.objects[r.obj].tier is tier]
            self._rids[tier] = tier.scheduler.register(
                [(r.nbytes, r.l0, r.l1) for r in mine], self.plan.n_layers, self.t_layer,
                hold=self.hold, layer0=self._layer0)
            self._positions.update((id(r), n) for n, r in enumerate(mine))

    def _layer0(self) -> bool:
        """For the scheduler's first-layer hold: layer 0 is in place, or will not be."""
        return self.readiness.is_ready(0) or self.readiness.failed is not None

    def _read(self, o: PlannedObject, r: Read):
        """The coroutine of one read through the store, after its grant where the tier schedules."""
        whole = r.start == 0 and r.end == o.info.size

        def factory():
            return o.tier.read(o.info) if whole else o.tier.read_range(o.info.name, r.start, r.end)
        if o.tier in self._rids:
            return o.tier.scheduler.read(self._rids[o.tier], self._positions[id(r)], factory)
        return factory()

    def _queue_pull(self, o: PlannedObject, r: Read) -> None:
        """A read for a pull thread: started at its grant with no task of its own (`_pull`), and
        only its end comes back to the loop, to free the grant."""
        source = o.tier.range_reader.source(o.info.name, r.start, r.end)
        skip = functools.partial(self._fail, r, "cancelled")
        if o.tier not in self._rids:
            o.tier.pull(functools.partial(self._pull, r, source, lambda landed: None), skip)
            return
        sched, rid, index, loop = o.tier.scheduler, self._rids[o.tier], self._positions[id(r)], self.ctx.loop

        def end(landed: bool) -> None:
            try:
                loop.call_soon_threadsafe(sched.finished, rid, index, landed)
            except RuntimeError:  # the loop is closed: so is the scheduler
                pass

        def never_ran() -> None:  # granted, then the pull threads shut down
            skip()
            end(False)
        sched.submit(rid, index, DirectRead(lambda: o.tier.pull(functools.partial(self._pull, r, source, end),
                                                                never_ran), skip))

    # ---- receive -------------------------------------------------------------------------

    def _footer(self, i: int, task: asyncio.Task) -> None:
        """On the loop thread: object i's footer came (its ranges waiting for it go on), or cannot."""
        self._futs.discard(task)
        obj, job = self.plan.objects[i], self._jobs[i]
        exc = CancelledError("cancelled") if task.cancelled() else task.exception()
        if exc is None:
            try:
                job.set_header(task.result())
                obj.tier.headers.put(obj.info.name, job.header)
                return
            except CorruptObject as e:
                exc = e
        job.header_failed(exc)
        if isinstance(exc, CorruptObject):
            with job.lock:
                first = not job.failed
                job.failed = True
            if first:
                self.ctx.on_event("corrupt", obj, exc)
        elif not isinstance(exc, CancelledError):
            self.ctx.on_event("io_error", obj, exc)

    def _fetched(self, read: Read, task: asyncio.Task) -> None:
        """On the loop thread: hand the bytes to a copy thread, or record the failure."""
        self._futs.discard(task)
        obj = self.plan.objects[read.obj]
        if task.cancelled():
            self._fail(read, "cancelled")
            return
        exc = task.exception()
        if exc is not None:
            self.ctx.on_event("io_error", obj, exc)
            self._fail(read, f"{type(exc).__name__}: {exc}")
            return
        try:
            self.ctx.copiers.submit(self._copy, read, task.result())
        except RuntimeError:  # the copy pool is shut down: the cache is closing
            self._fail(read, "closing")

    def _pull(self, read: Read, source, end: Callable[[bool], None]) -> None:
        """On a pull thread: one read, start to end; `end(landed)` frees its grant."""
        landed = False
        try:
            landed = self.pulled(read, source) is DELIVERED
            if not landed:
                self._fail(read, "cancelled")
        except Exception as e:  # noqa: BLE001 - a transport error is this read's miss, never a crash
            self.ctx.on_event("io_error", self.plan.objects[read.obj], e)
            self._fail(read, f"{type(e).__name__}: {e}")
        finally:
            end(landed)

    def pulled(self, read: Read, source) -> object:
        """On a pull thread: receive the read's bytes from `source` (stores/base.RangeSource) and
        put them in place there, piece by piece as they arrive where the range allows it, else
        whole into a reused buffer first. Returns DELIVERED, or SKIPPED once the session is
        cancelled; a transport error propagates. A cancelled session does not wait for the
        network, only for copies that began before it was cancelled: `wait()` never returns with
        one of those running (pieces go in through the session's CopyGate; whole ranges count in
        `_copying`)."""
        if self._cancelled:
            return SKIPPED
        job = self._jobs[read.obj]
        if read.obj in self._footer_asked and job.header is None:
            # its footer left with the data requests and is a small response: give it a moment, so
            # that this range streams piece by piece instead of landing whole first
            job.header_known(FOOTER_MOMENT)
        pieces = job.pieces(read.start, read.end, read.l0, read.l1, self.segments) if getattr(source, "applies", True) else None
        if pieces is not None:
            outcome = source.apply(pieces, self._gate, self.readiness)  # counts each layer as it lands
            if outcome == CLOSED:
                return SKIPPED
            if outcome == SHORT:
                self._broken(read, CorruptObject(f"range {read.start}-{read.end} cut short: object truncated"))
            elif outcome >= 0:
                self._broken(read, job.mismatch(read.l0, outcome))
            else:
                self._landed(read, [], job.landed())
            return DELIVERED
        with source.filled() as data:
            with self._lock:
                if self._cancelled:
                    return SKIPPED
                self._copying += 1
            try:
                self._copy(read, data)
            finally:
                with self._lock:
                    self._copying -= 1
                    finish = self._finishing_locked()
                if finish:
                    self._signal()
        return DELIVERED

    # ---- verify and copy -----------------------------------------------------------------

    def _copy(self, read: Read, data) -> None:
        job = self._jobs[read.obj]
        try:
            applied, complete = job.deliver(read.start, read.end, read.l0, read.l1, data, self.segments)
        except Exception as e:  # noqa: BLE001 - corrupt, or targets that do not fit; never raise into SGLang
            self._broken(read, e)
            return
        self._landed(read, applied, complete)

    def _broken(self, read: Read, e: Exception) -> None:
        """The read's object cannot be used: a miss, logged once per object."""
        obj, job = self.plan.objects[read.obj], self._jobs[read.obj]
        with job.lock:
            first = not job.failed
            job.failed = True
        if isinstance(e, CorruptObject):
            if first:
                self.ctx.on_event("corrupt", obj, e)
            self._fail(read, f"corrupt object {obj.info.name}: {e}")
        elif isinstance(e, (StoreError, CancelledError)):  # its footer could not be had: reported then
            self._fail(read, f"no footer for {obj.info.name}: {e}")
        else:
            self.ctx.on_event("copy_error", obj, e)
            self._fail(read, f"cannot copy {obj.info.name}: {e}")

    def _landed(self, read: Read, applied, complete) -> None:
        """The read's layer spans `applied` are in place; `complete`: its object is whole (False:
        not yet; None: the object failed meanwhile)."""
        obj, job = self.plan.objects[read.obj], self._jobs[read.obj]
        if complete is None:  # the object failed on another read: this one counts as done
            self._one_done(read)
            return
        obj.tier.health.ok()
        for l0, l1 in applied:
            self.readiness.arrived(l0, l1)
        if complete:
            for j in range(len(obj.slots)):
                self.ok[obj.first + j] = True
            self.ctx.on_event("used", obj, None)
            if job.promote is not None:  # ranges of the data only: the footer as it was read
                job.promote[obj.info.data_bytes:] = encode_meta(job.header)
                self.ctx.on_event("promote", obj, job.promote)
        self._one_done(read)

    # ---- collect -------------------------------------------------------------------------

    def _fail(self, read: Read, reason: str) -> None:
        with self._lock:
            settled = id(read) in self._settled
        if not settled:
            self.readiness.fail(reason)
        self._one_done(read)

    def _one_done(self, read: Read) -> None:
        with self._lock:
            if id(read) in self._settled:  # a pulled read whose task was cancelled, then landed
                return
            self._settled.add(id(read))
            self._left -= 1
            finish = self._finishing_locked()
        if finish:
            self._signal()

    def _finishing_locked(self) -> bool:
        """Under the lock: True exactly once, when every read is settled and no pulled copy runs."""
        if self._left == 0 and self._copying == 0 and not self._signalled:
            self._signalled = True
            return True
        return False

    def _signal(self) -> None:
        self._gate.close()  # a finished session takes no more bytes into the caller's pages
        self._on_finish()  # before waiters wake: they see its effects done
        self._finished.set()

    def _on_finish(self) -> None:
        """Once, as the session's last step: the switch interval and the schedulers let go."""
        switch.leave(self.ctx.switch_interval)
        self._meter_end()
        for tier, rid in self._rids.items():
            try:
                self.ctx.loop.call_soon_threadsafe(tier.scheduler.close_request, rid)
            except RuntimeError:  # the loop is closed: so is the scheduler
                pass

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop what has not arrived; the request fails with `reason`."""
        self.readiness.fail(reason)
        with self._lock:
            self._cancelled = True
        for job in self._jobs:  # ranges waiting for a footer stop waiting
            job.header_failed(CancelledError(reason))
        self._gate.close()  # pieces on their way in stop at the next one; none is being copied after this
        try:
            self.ctx.loop.call_soon_threadsafe(self._cancel_on_loop)
        except RuntimeError:  # loop closed: its tasks are cancelled already, but reads waiting in
            for read in self.plan.reads:  # a scheduler or on a pull thread settle here
                self._fail(read, reason)

    def _cancel_on_loop(self) -> None:
        for task in list(self._futs):
            task.cancel()
        for tier, rid in self._rids.items():  # skip the pulls not granted yet
            tier.scheduler.drop_waiting(rid)
        # pulls still on the network settle now: their bytes only fill staging buffers, and
        # `pulled` starts no copy once cancelled (those begun are waited for)
        for read in self._handed:
            self._fail(read, "cancelled")

    def wait(self, timeout: float) -> list[bool]:
        """Per-page results, once every read has landed or failed; after `timeout` seconds the rest
        is cancelled. Returns only when no copy into the caller's buffers is running."""
        if not self._finished.wait(timeout):
            pending = len(self._futs)
            self.ctx.on_event("timeout", None, pending)
            self.cancel(f"deadline of {timeout:.1f}s passed with {pending} reads pending")
            if not self._finished.wait(60.0):  # cancelled reads finish at once; copies are local
                log.error("objectcache: a fetch did not wind down within 60 s after its deadline")
        return list(self.ok)
