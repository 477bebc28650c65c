"""A fluid model of concurrent layer-ordered fetches under one bandwidth cap.

Bytes flow at `rate` through one link shared by the active requests as a policy says; each
request's reads go in plan order; a layer lands when its last read completes; the forward pass
computes layer l once it has landed and layer l-1 is done. Added TTFT is the time to the end of the
last layer's compute minus the no-transfer bound (arrival + layers x per-layer compute).

`best_serial` searches every order of serving requests one at a time (each in layer order) and
keeps the best mean added TTFT: for n equal requests arriving together and transfer-bound, this is
the optimum, and it beats equal sharing by 2n/(n+1).

Used by benchmarks/scheduler.py and tests/test_scheduler.py; not part of the package.
"""

from __future__ import annotations

import itertools
from copy import deepcopy
from dataclasses import dataclass

from sglang_objectcache.engine.policy import Policy, RequestState, Serial


@dataclass
class Outcome:
    name: str
    added: float  # added TTFT over the no-transfer bound, seconds
    first_layer: float  # time from arrival until layer 0 landed
    transfer_end: float  # time from arrival until the last byte landed


def simulate(requests: list[RequestState], rate: float, policy: Policy,
             write_bytes: float = 0.0) -> tuple[list[Outcome], float]:
    """Run the model. Writes (`write_bytes` of backup traffic) only get bandwidth no read uses.
    Returns the outcomes and when the writes finished."""
    reqs = deepcopy(requests)
    now, writes_left, writes_done = 0.0, float(write_bytes), 0.0 if not write_bytes else None
    pending = sorted(reqs, key=lambda r: r.arrival)
    active: list[RequestState] = []
    end_of = {}
    while pending or active or writes_left > 1e-9:
        while pending and pending[0].arrival <= now + 1e-12:
            r = pending.pop(0)
            if r.done:
                end_of[r.name] = now
            else:
                active.append(r)
        shares = policy.shares(active, now, rate)
        used = sum(shares.values())
        write_share = max(0.0, 1.0 - used) if writes_left > 1e-9 else 0.0
        steps = [r.left_in_read / (shares[r.name] * rate) for r in active if shares.get(r.name, 0) > 0]
        if write_share > 0:
            steps.append(writes_left / (write_share * rate))
        if pending:
            steps.append(pending[0].arrival - now)
        if not steps:
            break
        dt = max(0.0, min(steps))
        now += dt
        if write_share > 0:
            writes_left -= write_share * rate * dt
            if writes_left <= 1e-6 and writes_done is None:
                writes_left, writes_done = 0.0, now
        for r in list(active):
            s = shares.get(r.name, 0.0)
            if s > 0 and r.advance(s * rate * dt, now) and r.done:
                active.remove(r)
                end_of[r.name] = now
    out = []
    for r in reqs:
        bound = r.n_layers * r.t_layer
        out.append(Outcome(r.name, r.ttft() - bound, (r.ready[0] or r.arrival) - r.arrival,
                           end_of.get(r.name, r.arrival) - r.arrival))
    return out, (writes_done if writes_done is not None else 0.0)


class _FixedOrder(Serial):
    name = "fixed-order"

    def __init__(self, order: list[str]):
        self.rank = {n: i for i, n in enumerate(order)}

    def key(self, r, now, rate):
        return self.rank[r.name]


def mean_added(outcomes: list[Outcome]) -> float:
    return sum(o.added for o in outcomes) / len(outcomes)


def best_serial(requests: list[RequestState], rate: float, max_requests: int = 8) -> tuple[float, list[str]]:
    """Best mean added TTFT over all orders of serving requests one at a time (a request that
    has not arrived yet is skipped until it does), and that order."""
    if len(requests) > max_requests:
        raise ValueError(f"searching {len(requests)}! orders is too slow; at most {max_requests}")
    best = (float("inf"), [])
    for order in itertools.permutations([r.name for r in requests]):
        m = mean_added(simulate(requests, rate, _FixedOrder(list(order)))[0])
        if m < best[0] - 1e-12:
            best = (m, list(order))
    return best
