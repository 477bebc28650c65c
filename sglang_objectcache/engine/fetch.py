"""Running one fetch plan: requests on the loop, verify-and-copy on the copy threads, per-layer
readiness for whoever waits, per-page results at the end. Where a tier reads on its own pull
threads (the native reader), each read is handed to one of them at its grant, with no task of its
own, and received, verified and copied there (`_pull`, `pulled`): only its end comes back to the
loop.

Nothing here blocks the caller: `Fetch.start()` returns at once (one hand-over to the loop for all
reads); `wait()` blocks with a deadline.
After a deadline or `cancel()`, pending requests are cancelled, the request is marked failed (every
waiter released), and `wait()` still returns only once no copy into the caller's buffers is running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import logging
import threading
import time
from typing import Callable

from .. import native
from ..format import CorruptObject, SegmentFn
from .plan import FetchPlan, Read
from .readiness import LayerReadiness
from .reader import ObjectRead

log = logging.getLogger("sglang_objectcache")

DELIVERED = object()  # a pulled read's outcome: its bytes are in place (or it failed and said so)
SKIPPED = object()  # a pulled read that never started: the fetch was cancelled first


class _NoGate:
    """Where no read goes in piece by piece: nothing to close."""

    def close(self) -> None:
        pass


_NO_GATE = _NoGate()


class Fetch:
    def __init__(self, plan: FetchPlan, n_keys: int, segments: SegmentFn, *, digest: str, verify: bool,
                 submit: Callable, loop: asyncio.AbstractEventLoop, copiers: cf.Executor,
                 promote_buffer: Callable, on_event: Callable, on_finish: Callable[[], None] = lambda: None,
                 prepare: Callable[[], None] = lambda: None, direct: Callable | None = None,
                 drop: Callable[[], None] = lambda: None):
        self.plan = plan
        self.segments = segments
        self.ok = [False] * n_keys
        self.readiness = LayerReadiness(plan.n_layers, plan.pending_per_layer())
        self.started = time.monotonic()
        self._submit = submit  # (PlannedObject, Read) -> coroutine giving the bytes
        self._loop = loop
        self._copiers = copiers
        self._on_event = on_event  # (kind, PlannedObject, detail) for stats, logs, bans, promotion
        self._on_finish = on_finish
        self._prepare = prepare  # on the loop, before the first read (the scheduler's registration)
        # (PlannedObject, Read, run, skip) -> True where the read goes to a pull thread at its grant,
        # with no task of its own (`run(filled, end)` there; `skip()` if it never starts)
        self._direct = direct
        self._drop = drop  # on the loop, at cancel: skip the direct reads not granted yet
        self._handed: list[Read] = []  # direct reads (loop thread only)
        per_object = [0] * len(plan.objects)
        for r in plan.reads:
            per_object[r.obj] += 1
        self._jobs = [ObjectRead(o.info, o.slots, o.first, per_object[i], digest, verify,
                                 promote_buffer(o), trusted=o.trusted)
                      for i, o in enumerate(plan.objects)]
        self._lock = threading.Lock()
        self._left = len(plan.reads)
        self._settled: set[int] = set()  # id() of reads counted done: each counts once
        self._copying = 0  # pull threads copying into the caller's buffers: not finished while any is
        self._signalled = False
        self._finished = threading.Event()
        self._cancelled = False
        self._gate = native.CopyGate() if direct is not None and native.http_get_pieces() else _NO_GATE
        # reads not yet landed (loop thread only); a landed read leaves at once, so that its bytes
        # are freed as soon as they are copied (a task keeps its result)
        self._futs: set[asyncio.Task] = set()
        if not self._left:
            self._signalled = True
            on_finish()
            self._finished.set()

    def start(self) -> "Fetch":
        """Hand every read to the loop in one call: one cross-thread wake-up per fetch, not one per
        read (each costs the caller a GIL hand-over, slow next to SGLang's busy threads)."""
        if self._left:
            try:
                self._loop.call_soon_threadsafe(self._spawn)
            except RuntimeError:  # the loop is closed: the cache is closing
                for read in self.plan.reads:
                    self._fail(read, "closing")
        return self

    def _spawn(self) -> None:
        """On the loop thread: a task per read (the scheduler decides when each one goes)."""
        try:
            self._prepare()
        except Exception as e:  # noqa: BLE001 - a failed registration fails the fetch, not the loop
            self._cancelled = True
            self.readiness.fail(f"cannot start: {e}")
        for read in self.plan.reads:
            if self._cancelled:  # cancelled before the reads were started
                self._fail(read, "cancelled")
                continue
            if self._direct is not None and self._direct(
                    self.plan.objects[read.obj], read, functools.partial(self._pull, read),
                    functools.partial(self._fail, read, "cancelled")):
                self._handed.append(read)
                continue
            task = self._loop.create_task(self._submit(self.plan.objects[read.obj], read))
            self._futs.add(task)
            task.add_done_callback(functools.partial(self._fetched, read))

    def _fetched(self, read: Read, task: asyncio.Task) -> None:
        """On the loop thread: hand the bytes to a copy thread, or record the failure."""
        self._futs.discard(task)
        obj = self.plan.objects[read.obj]
        if task.cancelled():
            self._fail(read, "cancelled")
            return
        exc = task.exception()
        if exc is not None:
            self._on_event("io_error", obj, exc)
            self._fail(read, f"{type(exc).__name__}: {exc}")
            return
        try:
            self._copiers.submit(self._copy, read, task.result())
        except RuntimeError:  # the copy pool is shut down: the cache is closing
            self._fail(read, "closing")

    def _pull(self, read: Read, source, end: Callable[[bool], None]) -> None:
        """On a pull thread: one direct read, start to end; `end(landed)` frees its grant."""
        landed = False
        try:
            landed = self.pulled(read, source) is DELIVERED
            if not landed:
                self._fail(read, "cancelled")
        except Exception as e:  # noqa: BLE001 - a transport error is this read's miss, never a crash
            self._on_event("io_error", self.plan.objects[read.obj], e)
            self._fail(read, f"{type(e).__name__}: {e}")
        finally:
            end(landed)

    def pulled(self, read: Read, source) -> object:
        """On a pull thread: receive the read's bytes from `source` (stores/rawhttp.RangeSource)
        and put them in place there, piece by piece as they arrive where the range allows it, else
        whole into a buffer of its own first. Returns DELIVERED, or SKIPPED once the fetch is
        cancelled; a transport error propagates. A cancelled fetch does not wait for the network,
        only for copies that began before it was cancelled: `wait()` never returns with one of
        those running (pieces go in through the fetch's CopyGate; whole ranges count in
        `_copying`)."""
        if self._cancelled:
            return SKIPPED
        job = self._jobs[read.obj]
        pieces = job.pieces(read.start, read.end, read.l0, read.l1, self.segments) if source.pieces else None
        if pieces is not None:
            return self._receive_pieces(read, source, pieces)
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

    def _receive_pieces(self, read: Read, source, pieces) -> object:
        from ..stores.rawhttp import CLOSED, SHORT

        outcome = source.apply(pieces, self._gate, self.readiness)  # counts each layer as it lands
        if outcome == CLOSED:
            return SKIPPED
        job = self._jobs[read.obj]
        if outcome == SHORT:
            self._broken(read, CorruptObject(f"range {read.start}-{read.end} cut short: object truncated"))
        elif outcome >= 0:
            self._broken(read, job.mismatch(read.l0, outcome))
        else:
            self._landed(read, [], job.landed())
        return DELIVERED

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
                self._on_event("corrupt", obj, e)
            self._fail(read, f"corrupt object {obj.info.name}: {e}")
        else:
            self._on_event("copy_error", obj, e)
            self._fail(read, f"cannot copy {obj.info.name}: {e}")

    def _landed(self, read: Read, applied, complete) -> None:
        """The read's layer spans `applied` are in place; `complete`: its object is whole (False:
        not yet; None: the object failed meanwhile)."""
        obj, job = self.plan.objects[read.obj], self._jobs[read.obj]
        if complete is None:  # the object failed on another read: this one counts as done
            self._one_done(read)
            return
        for l0, l1 in applied:
            self.readiness.arrived(l0, l1)
        if complete:
            for j in range(len(obj.slots)):
                self.ok[obj.first + j] = True
            if job.promote is not None:
                self._on_event("promote", obj, job.promote)
        self._one_done(read)

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
        self._gate.close()  # a finished fetch takes no more bytes into the caller's pages
        self._on_finish()  # before waiters wake: they see its effects done
        self._finished.set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop what has not arrived; the request fails with `reason`."""
        self.readiness.fail(reason)
        with self._lock:
            self._cancelled = True
        self._gate.close()  # pieces on their way in stop at the next one; none is being copied after this
        try:
            self._loop.call_soon_threadsafe(self._cancel_on_loop)
        except RuntimeError:  # loop closed: its tasks are cancelled already, but reads waiting in
            for read in self.plan.reads:  # a scheduler or on a pull thread settle here
                self._fail(read, reason)

    def _cancel_on_loop(self) -> None:
        for task in list(self._futs):
            task.cancel()
        self._drop()
        # direct reads still on the network settle now: their bytes only fill staging buffers,
        # and `pulled` starts no copy once cancelled (those begun are waited for)
        for read in self._handed:
            self._fail(read, "cancelled")

    def wait(self, timeout: float) -> list[bool]:
        """Per-page results, once every read has landed or failed; after `timeout` seconds the rest
        is cancelled. Returns only when no copy into the caller's buffers is running."""
        if not self._finished.wait(timeout):
            pending = len(self._futs)
            self._on_event("timeout", None, pending)
            self.cancel(f"deadline of {timeout:.1f}s passed with {pending} reads pending")
            if not self._finished.wait(60.0):  # cancelled reads finish at once; copies are local
                log.error("objectcache: a fetch did not wind down within 60 s after its deadline")
        return list(self.ok)
