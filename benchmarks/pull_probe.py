"""Where does the engine's read rate go? One SeaweedFS, the same stored prefix, one run.

Inside SGLang the layer-wise read runs at about the engine's own rate, well below what a plain
client gets from the same server. This reads the same planned ranges five ways, each alone and
next to a thread that runs Python without pause (as SGLang's scheduler does):

- `plain async`: obstore `get_range_async`, `--conc` in flight on one loop, bytes dropped (the ceiling);
- `plain threads`: `--conc` threads, each a blocking obstore `get_range`, bytes dropped;
- `threads + copy`: the same threads, each verifying and copying its range into the pages
  (`ObjectRead.deliver`, the engine's native call) before it takes the next: no loop, no hand-over;
- `engine`: `ObjectCache.get` (loop, scheduler, copy threads), as SGLang calls it;
- `engine, no verify`: the same with `verify_checksums: false`.

    python benchmarks/pull_probe.py --pages 256 [--conc 32,64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gil import Busy  # noqa: E402
from transports import LAYERS, PAGE_BYTES, PIECE, llama_fingerprint, page_keys, segments_of  # noqa: E402



def plain_async(store, reads, conc: int) -> None:
    import obstore as obs

    async def run():
        sem = asyncio.Semaphore(conc)

        async def one(path, s, e):
            async with sem:
                await obs.get_range_async(store, path, start=s, end=e)
        await asyncio.gather(*[one(*r) for r in reads])
    asyncio.run(run())


def threads(reads, work, conc: int) -> None:
    """`conc` threads take reads in plan order and run `work(read)` each."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    for r in reads:
        q.put(r)
    errors = []

    def loop():
        while True:
            try:
                r = q.get_nowait()
            except queue.Empty:
                return
            try:
                work(r)
            except Exception as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
    ts = [threading.Thread(target=loop) for _ in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=256, help="8 MiB Llama-3.1-8B pages (256 = 2 GiB)")
    ap.add_argument("--reps", type=int, default=2, help="best of")
    ap.add_argument("--conc", default="32", help="requests in flight (the engine's max_connections); "
                    "a comma-separated list runs each")
    args = ap.parse_args(argv)
    for conc in (int(c) for c in args.conc.split(",")):
        probe(args, conc)
    return 0


def probe(args, conc: int) -> None:
    import obstore as obs

    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    from sglang_objectcache.engine.reader import ObjectRead
    from sglang_objectcache.testbed import servers

    srv = servers.start_seaweedfs(memory_limit_mb=None, reader_cache_mb=None)
    os.environ.update(srv.env())
    tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": "pull",
            "max_connections": conc}
    fp = llama_fingerprint("pull")
    data = np.random.default_rng(0).integers(0, 256, size=(args.pages, LAYERS, PIECE), dtype=np.uint8)
    keys = page_keys(args.pages)
    caches = {v: ObjectCache(parse_config({"tiers": [tier], "verify_checksums": v}), fp) for v in (True, False)}
    try:
        assert all(caches[True].put(keys, segments_of(data)))
        caches[True].flush()
        cache = caches[True]
        out = np.zeros_like(data)
        f = cache.fetch(keys, segments_of(out))
        assert all(f.wait(120)) and np.array_equal(out, data)
        plan, store = f.plan, cache.tiers[-1].store._store
        reads = [(plan.objects[r.obj].info.name, r.start, r.end) for r in plan.reads]
        nbytes = sum(e - s for _, s, e in reads)

        def copy_run():
            jobs = [ObjectRead(o.info, o.slots, o.first, plan.reads_of(i), cache.digest, True, None,
                               trusted=o.trusted) for i, o in enumerate(plan.objects)]
            segs = segments_of(out)

            def work(r):
                o = plan.objects[r.obj]
                buf = obs.get_range(store, o.info.name, start=r.start, end=r.end)
                jobs[r.obj].deliver(r.start, r.end, r.l0, r.l1, buf, segs)
            threads(plan.reads, work, conc)

        ways = {
            "plain async": lambda: plain_async(store, reads, conc),
            "plain threads": lambda: threads(reads, lambda r: obs.get_range(store, r[0], start=r[1], end=r[2]), conc),
            "threads + copy": copy_run,
            "engine": lambda: caches[True].get(keys, segments_of(out)),
            "engine, no verify": lambda: caches[False].get(keys, segments_of(out)),
        }
        print(f"{os.cpu_count()} cores; {conc} in flight; {len(reads)} ranges, {nbytes / 2**30:.2f} GiB; GIL switch interval "
              f"{sys.getswitchinterval() * 1e3:.2f} ms; GiB/s, best of {args.reps}", flush=True)
        for name, fn in ways.items():
            rates = []
            for busy in (False, True):
                best = 0.0
                with Busy() if busy else contextlib.nullcontext():
                    for _ in range(args.reps):
                        out[:] = 0
                        t = time.perf_counter()
                        fn()
                        best = max(best, nbytes / (time.perf_counter() - t) / 2**30)
                if name not in ("plain async", "plain threads"):
                    assert np.array_equal(out, data), name
                rates.append(best)
            print(f"  {name:18s} alone {rates[0]:5.2f}  next to a busy thread {rates[1]:5.2f}", flush=True)
    finally:
        for c in caches.values():
            c.close()
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
