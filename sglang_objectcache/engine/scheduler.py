"""The scheduler of real transfers: which request's next range read goes now, under a bandwidth cap.

Runs on the runtime loop. Every fetch registers its plan (reads in layer order, with the compute
time per layer of its forward pass when known); each read waits for a grant. Grants go out while
fewer than `max_inflight` reads are in flight and the token bucket holds the read's bytes (a cap of
`rate` bytes/s; none when rate is 0), to the request the policy ranks first (engine/policy.py), one
read at a time in that request's plan order. Writes are not scheduled here: they have their own,
lower-priority slots (engine/slots.py), so they only use what reads leave.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from typing import Callable

from .policy import Policy, RequestState


@dataclass(frozen=True)
class DirectRead:
    """A read started by a call at its grant instead of a woken task (the native reader's pull
    threads): `start()` runs on the loop and must not block; `skip()` settles a read dropped before
    its grant. Its end is reported with `ReadScheduler.finished`. No task and no future per read:
    each loop step a read costs waits for the GIL, which SGLang's scheduler thread holds most of
    the time."""

    start: Callable[[], None]
    skip: Callable[[], None]


class _View(RequestState):
    """A request as the policy sees it: `next_read` is the next read not yet granted; layers whose
    reads are granted but still in flight count as landing now."""

    def compute_finish(self, upto: int) -> float:
        t, now = self.arrival, time.monotonic()
        for layer in range(upto):
            r = self.ready[layer]
            t = max(t, now if r is None else r) + self.t_layer
        return t


@dataclass
class _Req:
    view: _View
    waiting: dict[int, "asyncio.Future | DirectRead"] = field(default_factory=dict)
    pending_per_layer: list[int] = field(default_factory=list)
    last_grant: int = -1


class ReadScheduler:
    def __init__(self, policy: Policy, rate: float = 0.0, max_inflight: int = 32):
        self.policy = policy
        self.rate = rate
        self.max_inflight = max_inflight
        # 50 ms worth of tokens: enough to keep the pipe full, small enough to keep to the cap
        self.burst = max(64 << 10, rate * 0.05)
        burst = self.burst
        self.inflight = 0
        self._reqs: dict[int, _Req] = {}
        self._ids = itertools.count()
        self._grants = itertools.count()
        self._tokens = burst
        self._last = time.monotonic()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.granted_bytes = 0

    def register(self, reads: list[tuple[int, int, int]], n_layers: int, t_layer: float = 0.0) -> int:
        """A request's reads as (bytes, first layer, end layer), in plan order. On the loop."""
        rid = next(self._ids)
        view = _View(f"r{rid}", time.monotonic(), list(reads), n_layers, t_layer)
        pending = [0] * n_layers
        for _, l0, l1 in reads:
            for layer in range(max(l0, 0), l1):
                pending[layer] += 1
        self._reqs[rid] = _Req(view, {}, pending)
        return rid

    async def read(self, rid: int, index: int, factory):
        """Wait for the grant of read `index` of request `rid`, then run `factory()`."""
        req = self._reqs[rid]
        fut = asyncio.get_running_loop().create_future()
        req.waiting[index] = fut
        self._kick()
        try:
            await fut
        except asyncio.CancelledError:
            req.waiting.pop(index, None)
            if fut.done() and not fut.cancelled():
                self._finished(rid, index, landed=False)
            raise
        try:
            result = await factory()
        except BaseException:
            self._finished(rid, index, landed=False)
            raise
        self._finished(rid, index, landed=True)
        return result

    def submit(self, rid: int, index: int, read: DirectRead) -> None:
        """Queue read `index` of request `rid` to be started by `read.start()` at its grant. On the
        loop."""
        self._reqs[rid].waiting[index] = read
        self._kick()

    def finished(self, rid: int, index: int, landed: bool) -> None:
        """A started DirectRead has ended (landed: its bytes came). On the loop."""
        self._finished(rid, index, landed)

    def drop_waiting(self, rid: int) -> None:
        """Skip the request's DirectReads not granted yet (its fetch was cancelled). On the loop."""
        req = self._reqs.get(rid)
        if req is None:
            return
        for index, w in list(req.waiting.items()):
            if isinstance(w, DirectRead):
                del req.waiting[index]
                w.skip()

    def close(self) -> None:
        """The engine is closing: skip every DirectRead not granted yet (a waiting task is
        cancelled with the loop, a DirectRead has no task). On the loop."""
        for rid in list(self._reqs):
            self.drop_waiting(rid)

    def close_request(self, rid: int) -> None:
        self._reqs.pop(rid, None)
        self._kick()

    def _finished(self, rid: int, index: int, landed: bool) -> None:
        self.inflight -= 1
        req = self._reqs.get(rid)
        if req is not None and landed:
            _, l0, l1 = req.view.reads[index]
            now = time.monotonic()
            for layer in range(max(l0, 0), l1):
                req.pending_per_layer[layer] -= 1
                if req.pending_per_layer[layer] == 0:
                    req.view.ready[layer] = now
        self._kick()

    def _kick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    def _candidates(self) -> list[_Req]:
        return [r for r in self._reqs.values()
                if not r.view.done and r.view.next_read in r.waiting]

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.inflight < self.max_inflight:
                cands = self._candidates()
                if not cands:
                    break
                if len(cands) == 1:  # nothing to rank: the common case of one request at a time
                    best = cands[0]
                else:
                    now = time.monotonic()
                    shares = self.policy.shares([c.view for c in cands], now, self.rate or 1e12)
                    # serial policies name one request; `fair` shares equally: each active request
                    # in turn (the least recently granted first), which is equal sharing per read
                    best = max(cands, key=lambda c: (shares.get(c.view.name, 0.0), -c.last_grant
                                                     if len(shares) > 1 else 0, -c.view.arrival))
                nbytes = best.view.reads[best.view.next_read][0]
                if self.rate:
                    self._refill()
                    if self._tokens < min(nbytes, self.burst):
                        await asyncio.sleep((min(nbytes, self.burst) - self._tokens) / self.rate)
                        continue  # re-rank after the wait: someone more urgent may have come
                    self._tokens -= nbytes
                best.last_grant = next(self._grants)  # only an actual grant takes a turn
                index = best.view.next_read
                best.view.next_read += 1
                best.view.left_in_read = float(best.view.reads[index + 1][0]) if not best.view.done else 0.0
                self.inflight += 1
                self.granted_bytes += nbytes
                fut = best.waiting.pop(index)
                if isinstance(fut, DirectRead):
                    fut.start()
                elif not fut.done():
                    fut.set_result(None)
                else:
                    self.inflight -= 1

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
