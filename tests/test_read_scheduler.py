"""The read scheduler's grants on a real event loop (no network): the first-layer hold."""

from __future__ import annotations

import asyncio
import time

from sglang_objectcache.engine.policy import POLICIES
from sglang_objectcache.engine.scheduler import DirectRead, ReadScheduler

MiB = 1 << 20
# two objects, read as the plan orders them: layer group 0 of both, then group 1 of both
READS = [(16 * MiB, 0, 8), (16 * MiB, 0, 8), (16 * MiB, 8, 16), (16 * MiB, 8, 16)]


def granted_while(hold: float, layer0, steps):
    """Register READS with a first-layer hold, submit them all, then run `steps` (seconds to wait,
    or a callable to call) in order; returns the indexes granted after each step."""
    seen: list[list[int]] = []

    async def main():
        s = ReadScheduler(POLICIES["slack"], 0, max_inflight=8)
        rid = s.register(READS, 16, hold=hold, layer0=layer0)
        started: list[int] = []
        for i in range(len(READS)):
            s.submit(rid, i, DirectRead(lambda i=i: started.append(i), lambda: None))
        for step in steps:
            if callable(step):
                step()
            else:
                await asyncio.sleep(step)
            seen.append(list(started))
    asyncio.run(main())
    return seen


def test_reads_past_layer_zero_wait_for_it_then_go():
    landed = []
    seen = granted_while(5.0, lambda: bool(landed), [0.05, lambda: landed.append(True), 0.05])
    assert seen[0] == [0, 1], "only the reads that carry layer 0 start at first"
    assert seen[2] == [0, 1, 2, 3], "once layer 0 is in, the rest go (the loop looks without a call)"


def test_the_hold_ends_at_its_limit_when_layer_zero_does_not_come():
    t0 = time.monotonic()
    seen = granted_while(0.1, lambda: False, [0.02, 0.2])
    assert seen[0] == [0, 1] and seen[1] == [0, 1, 2, 3]
    assert time.monotonic() - t0 < 2


def test_no_hold_grants_everything_at_once():
    assert granted_while(0.0, lambda: False, [0.02]) == [[0, 1, 2, 3]]
