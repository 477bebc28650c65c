"""Running one fetch plan: requests on the loop, verify-and-copy on the copy threads, per-layer
readiness for whoever waits, per-page results at the end.

Nothing here blocks the caller: `Fetch.start()` returns at once; `wait()` blocks with a deadline.
After a deadline or `cancel()`, pending requests are cancelled, the request is marked failed (every
waiter released), and `wait()` still returns only once no copy into the caller's buffers is running.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from typing import Callable

from ..format import CorruptObject, SegmentFn
from .plan import FetchPlan, Read
from .readiness import LayerReadiness
from .reader import ObjectRead

log = logging.getLogger("sglang_objectcache")


class Fetch:
    def __init__(self, plan: FetchPlan, n_keys: int, segments: SegmentFn, *, digest: str, verify: bool,
                 submit: Callable, copiers: cf.Executor, promote_buffer: Callable, on_event: Callable,
                 on_finish: Callable[[], None] = lambda: None):
        self.plan = plan
        self.segments = segments
        self.ok = [False] * n_keys
        self.readiness = LayerReadiness(plan.n_layers, plan.pending_per_layer())
        self._submit = submit  # (PlannedObject, Read) -> concurrent future of the bytes
        self._copiers = copiers
        self._on_event = on_event  # (kind, PlannedObject, detail) for stats, logs, bans, promotion
        self._on_finish = on_finish
        self._jobs = [ObjectRead(o.info, o.slots, o.first, plan.reads_of(i), digest, verify,
                                 promote_buffer(o), trusted=o.trusted)
                      for i, o in enumerate(plan.objects)]
        self._lock = threading.Lock()
        self._left = len(plan.reads)
        self._finished = threading.Event()
        # reads not yet landed; a landed read leaves at once, so that its bytes are freed as soon as
        # they are copied (a future keeps its result, and the callback closure keeps this Fetch)
        self._futs: set[cf.Future] = set()
        if not self._left:
            self._finished.set()
            on_finish()

    def start(self) -> "Fetch":
        for read in self.plan.reads:
            fut = self._submit(self.plan.objects[read.obj], read)
            with self._lock:
                self._futs.add(fut)
            fut.add_done_callback(lambda f, r=read: self._fetched(r, f))
        return self

    def _fetched(self, read: Read, fut: cf.Future) -> None:
        """On the loop thread: hand the bytes to a copy thread, or record the failure."""
        with self._lock:
            self._futs.discard(fut)
        obj = self.plan.objects[read.obj]
        if fut.cancelled():
            self._fail(read, "cancelled")
            return
        exc = fut.exception()
        if exc is not None:
            self._on_event("io_error", obj, exc)
            self._fail(read, f"{type(exc).__name__}: {exc}")
            return
        try:
            self._copiers.submit(self._copy, read, fut.result())
        except RuntimeError:  # the copy pool is shut down: the cache is closing
            self._fail(read, "closing")

    def _copy(self, read: Read, data) -> None:
        obj, job = self.plan.objects[read.obj], self._jobs[read.obj]
        try:
            applied, complete = job.deliver(read.start, read.end, read.l0, read.l1, data, self.segments)
        except CorruptObject as e:
            with job.lock:
                first = not job.failed
                job.failed = True
            if first:
                self._on_event("corrupt", obj, e)
            self._fail(read, f"corrupt object {obj.info.name}: {e}")
            return
        except Exception as e:  # noqa: BLE001 - e.g. targets that do not fit; never raise into SGLang
            job.failed = True
            self._on_event("copy_error", obj, e)
            self._fail(read, f"cannot copy {obj.info.name}: {e}")
            return
        for l0, l1 in applied:
            self.readiness.arrived(l0, l1)
        if complete:
            for j in range(len(obj.slots)):
                self.ok[obj.first + j] = True
            if job.promote is not None:
                self._on_event("promote", obj, job.promote)
        self._one_done()

    def _fail(self, read: Read, reason: str) -> None:
        self.readiness.fail(reason)
        self._one_done()

    def _one_done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._finished.set()
                self._on_finish()

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop what has not arrived; the request fails with `reason`."""
        self.readiness.fail(reason)
        with self._lock:
            futs = list(self._futs)
        for f in futs:
            f.cancel()

    def wait(self, timeout: float) -> list[bool]:
        """Per-page results, once every read has landed or failed; after `timeout` seconds the rest
        is cancelled. Returns only when no copy into the caller's buffers is running."""
        if not self._finished.wait(timeout):
            with self._lock:
                pending = sum(1 for f in self._futs if not f.done())
            self._on_event("timeout", None, pending)
            self.cancel(f"deadline of {timeout:.1f}s passed with {pending} reads pending")
            if not self._finished.wait(60.0):  # cancelled reads finish at once; copies are local
                log.error("objectcache: a fetch did not wind down within 60 s after its deadline")
        return list(self.ok)
