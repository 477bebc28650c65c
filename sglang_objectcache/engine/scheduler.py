"""The scheduler of real transfers: which request's next range read goes now, under a bandwidth cap.

Runs on the runtime loop. Every fetch registers its plan (reads in layer order, with the compute
time per layer of its forward pass when known); each read waits for a grant. Grants go out while
fewer than `max_inflight` reads are in flight and the token bucket holds the read's bytes (a cap of
`rate` bytes/s; none when rate is 0), to the request the policy ranks first (engine/policy.py), one
read at a time in that request's plan order. Writes are not scheduled here: they have their own,
lower-priority slots (engine/slots.py), so they only use what reads leave.

A request registered with a first-layer hold grants the reads that carry layer 0 (its first
ranges) at once and holds the rest until its layer 0 has landed or the hold has passed: a server
serves concurrent ranges unevenly, and the first layer of each first range comes later when the
second ranges compete with it (docs/benchmarks.md, "Why the defaults"). The loop looks at the request's layer
0 every millisecond while a hold lasts (its readiness is counted by the pull threads, with no call
to the loop).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from typing import Callable

from .policy import Policy, RequestState

_HOLD_POLL = 0.001  # seconds between looks at a held request's layer 0


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
    # first-layer hold: until `hold_until` (monotonic), or until layer0() is true, reads that do
    # not carry layer 0 wait; None: no hold (or over)
    hold_until: float | None = None
    layer0: Callable[[], bool] | None = None

    def held(self, now: float) -> bool:
        """Is the next read held back? Ends the hold for good once layer 0 is in or time is up."""
        if self.hold_until is None:
            return False
        if now >= self.hold_until or self.layer0():
            self.hold_until = None
            return False
        return self.view.reads[self.view.next_read][1] > 0


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
        self._poll: asyncio.TimerHandle | None = None  # a look at held requests, while any is held
        self.granted_bytes = 0

    def register(self, reads: list[tuple[int, int, int]], n_layers: int, t_layer: float = 0.0, *,
                 hold: float = 0.0, layer0: Callable[[], bool] | None = None) -> int:
        """A request's reads as (bytes, first layer, end layer), in plan order. With `hold` > 0 and
        `layer0` (is the request's layer 0 in place, or has it failed?), reads that do not carry
        layer 0 wait for it, at most `hold` seconds. On the loop."""
        rid = next(self._ids)
        now = time.monotonic()
        view = _View(f"r{rid}", now, list(reads), n_layers, t_layer)
        pending = [0] * n_layers
        for _, l0, l1 in reads:
            for layer in range(l0, l1):
                pending[layer] += 1
        held = hold > 0 and layer0 is not None
        self._reqs[rid] = _Req(view, {}, pending, hold_until=now + hold if held else None,
                               layer0=layer0 if held else None)
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
            for layer in range(l0, l1):
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
        now, cands, holding = time.monotonic(), [], False
        for r in self._reqs.values():
            if r.view.done or r.view.next_read not in r.waiting:
                continue
            if r.held(now):
                holding = True
                continue
            cands.append(r)
        if holding and self._poll is None:  # look again soon: layer 0 lands with no call to the loop
            self._poll = asyncio.get_running_loop().call_later(_HOLD_POLL, self._end_poll)
        return cands

    def _end_poll(self) -> None:
        self._poll = None
        self._kick()

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
