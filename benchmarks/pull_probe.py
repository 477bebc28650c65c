"""Where does the engine's read rate go? One SeaweedFS, the same stored prefix, one run.

Inside SGLang the layer-wise read runs at about the engine's own rate, well below what a plain
client gets from the same server. This reads the same planned ranges five ways, each alone and
next to a thread that runs Python without pause (as SGLang's scheduler does):

- `plain async`: obstore `get_range_async`, `--conc` in flight on one loop, bytes dropped (the ceiling);
- `plain threads`: `--conc` threads, each a blocking obstore `get_range`, bytes dropped;
- `threads + copy`: the same threads, each verifying and copying its range into the pages
  (`ObjectRead.deliver`, the engine's native call) before it takes the next: no loop, no hand-over;
- `native threads`: the same threads, each a blocking native range GET (`stores/rawhttp.py`) into
  its own buffer, bytes dropped;
- `native + copy`: those, each verifying and copying its range into the pages before the next;
- `native pieces`: the same threads, each a native range GET that checks and copies every piece as
  it arrives (`read_pieces`), with no staging buffer;
- `engine, obstore`: `ObjectCache.get` with `native_reads: off` (loop, scheduler, copy threads);
- `engine`: `ObjectCache.get` as configured by default (native reads on pull threads, received
  piece by piece), with an array of targets as SGLang's pools give it;
- `engine, staged`: the same with `native_receive: staging` (each range whole into a buffer first);
- `engine, no verify`: the same with `verify_checksums: false`;
- `engine, 1 ms switch`, `engine, Python's 5 ms`: the same with `switch_interval` 1 ms and 0 (the
  engine's default lowers it to 0.2 ms while it reads).

Next to the busy thread it also prints the share of that thread's pace (its loop count per second,
against the same loop alone) that each way left it: the interpreter time a read path takes from a
Python-bound thread such as SGLang's scheduler, whose forward pass launches its kernels in Python.

`--order` then asks what the plan's shape does to the layer order: for ranges of 16, 8, 4 and 2 MiB
(the first of each object one layer), each read by the thread-pulled ways, it prints when layers
0, 1 and the last are in place (ms after the first request) and what a forward pass of `--t-layer`
ms per layer, started with the load, would stall in all.

    python benchmarks/pull_probe.py --pages 256 [--conc 32,64] [--order --t-layer 13]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
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
from transports import LAYERS, PIECE, llama_fingerprint, page_keys, segments_of, table_of  # noqa: E402



def plain_async(store, reads, conc: int) -> None:
    import obstore as obs

    async def run():
        sem = asyncio.Semaphore(conc)

        async def one(path, s, e):
            async with sem:
                await obs.get_range_async(store, path, start=s, end=e)
        await asyncio.gather(*[one(*r) for r in reads])
    asyncio.run(run())


def threads(reads, work, conc: int) -> list[float]:
    """`conc` threads take reads in plan order and run `work(read)` each; when each one ended."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    for i, r in enumerate(reads):
        q.put((i, r))
    errors, ended = [], [0.0] * len(reads)

    def loop():
        while True:
            try:
                i, r = q.get_nowait()
            except queue.Empty:
                return
            try:
                work(r)
                ended[i] = time.perf_counter()
            except Exception as e:  # noqa: BLE001 - reported after the run
                errors.append(e)
    ts = [threading.Thread(target=loop) for _ in range(conc)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return ended


def layer_times(reads, ended, t0: float, n_layers: int) -> list[float]:
    """When each layer was in place: the last of the reads that carry it (ms after t0)."""
    ready = [0.0] * n_layers
    for r, t in zip(reads, ended):
        for layer in range(max(r.l0, 0), r.l1):
            ready[layer] = max(ready[layer], (t - t0) * 1e3)
    return ready


def stall(ready: list[float], t_layer: float) -> float:
    """What a forward pass of t_layer ms per layer, started with the load, waits in all (ms)."""
    f = 0.0
    for r in ready:
        f = max(f, r) + t_layer
    return f - t_layer * len(ready)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=256, help="8 MiB Llama-3.1-8B pages (256 = 2 GiB)")
    ap.add_argument("--reps", type=int, default=2, help="best of")
    ap.add_argument("--conc", default="32", help="requests in flight (the engine's max_connections); "
                    "a comma-separated list runs each")
    ap.add_argument("--order", action="store_true", help="also sweep the plan's range size (layer order)")
    ap.add_argument("--t-layer", type=float, default=13.0, help="forward ms per layer for --order's stall")
    args = ap.parse_args(argv)
    for conc in (int(c) for c in args.conc.split(",")):
        probe(args, conc)
    return 0


def probe(args, conc: int) -> None:
    import obstore as obs

    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    from sglang_objectcache.engine.plan import plan_fetch
    from sglang_objectcache.engine.reader import ObjectRead
    from sglang_objectcache.stores.credentials import Credentials
    from sglang_objectcache.stores.rawhttp import RawRangeReader
    from sglang_objectcache.testbed import servers

    srv = servers.start_seaweedfs(memory_limit_mb=None, reader_cache_mb=None)
    os.environ.update(srv.env())
    tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": "pull",
            "max_connections": conc}
    fp = llama_fingerprint("pull")
    data = np.random.default_rng(0).integers(0, 256, size=(args.pages, LAYERS, PIECE), dtype=np.uint8)
    keys = page_keys(args.pages)
    engines = {  # the engine's ways: changes to the tier's keys, and to the top level
        "engine, obstore": ({"native_reads": "off"}, {}),
        "engine": ({}, {}),
        "engine, staged": ({"native_receive": "staging"}, {}),
        "engine, no verify": ({}, {"verify_checksums": False}),
        "engine, 1 ms switch": ({}, {"switch_interval": "1ms"}),
        "engine, Python's 5 ms": ({}, {"switch_interval": 0}),
    }
    caches = {name: ObjectCache(parse_config({"tiers": [{**tier, **t}], **top}), fp)
              for name, (t, top) in engines.items()}
    try:
        cache = caches["engine, obstore"]
        assert all(cache.put(keys, segments_of(data)))
        cache.flush()
        out = np.zeros_like(data)
        f = cache.fetch(keys, segments_of(out))
        assert all(f.wait(120)) and np.array_equal(out, data)
        plan, store = f.plan, cache.tiers[-1].store._store
        reads = [(plan.objects[r.obj].info.name, r.start, r.end) for r in plan.reads]
        nbytes = sum(e - s for _, s, e in reads)

        raw = RawRangeReader(endpoint=srv.endpoint, bucket=srv.bucket, region=srv.region,
                             creds=Credentials(srv.access_key, srv.secret_key), request_timeout=30,
                             connect_timeout=5, max_idle=conc)
        biggest = max(r.nbytes for r in plan.reads)
        staging = threading.local()

        def native_get(path, s, e):
            if not hasattr(staging, "buf"):
                staging.buf = np.empty(max(biggest, 64 << 20), dtype=np.uint8)
            view = staging.buf[: e - s]
            raw.read_into(path, s, e, view)
            return view

        def copy_run(get, p=plan):
            jobs = [ObjectRead(o.info, o.slots, o.first, p.reads_of(i), cache.digest, True, None,
                               trusted=o.trusted) for i, o in enumerate(p.objects)]
            segs = segments_of(out)

            def work(r):
                o = p.objects[r.obj]
                jobs[r.obj].deliver(r.start, r.end, r.l0, r.l1, get(o.info.name, r.start, r.end), segs)
            return threads(p.reads, work, conc)

        def obstore_get(path, s, e):
            return obs.get_range(store, path, start=s, end=e)

        def pieces_run(p=plan):
            from sglang_objectcache.native import CopyGate

            jobs = [ObjectRead(o.info, o.slots, o.first, p.reads_of(i), cache.digest, True, None,
                               trusted=o.trusted) for i, o in enumerate(p.objects)]
            table, gate = table_of(out), CopyGate()

            def work(r):
                pieces = jobs[r.obj].pieces(r.start, r.end, r.l0, r.l1, table)
                assert raw.read_pieces(p.objects[r.obj].info.name, r.start, r.end, pieces, gate) == -1
            return threads(p.reads, work, conc)

        ways = {
            "plain async": lambda: plain_async(store, reads, conc),
            "plain threads": lambda: threads(reads, lambda r: obs.get_range(store, r[0], start=r[1], end=r[2]), conc),
            "threads + copy": lambda: copy_run(obstore_get),
            "native threads": lambda: threads(reads, lambda r: native_get(*r), conc),
            "native + copy": lambda: copy_run(native_get),
            "native pieces": lambda: pieces_run(),
            **{name: functools.partial(lambda c: c.get(keys, table_of(out)), c) for name, c in caches.items()},
        }
        print(f"{os.cpu_count()} cores; {conc} in flight; {len(reads)} ranges, {nbytes / 2**30:.2f} GiB; GIL switch interval "
              f"{sys.getswitchinterval() * 1e3:.2f} ms; GiB/s, best of {args.reps}", flush=True)
        for name, fn in ways.items():
            rates, kept = [], 0.0
            for busy in (False, True):
                pace = Busy.pace_alone() if busy else 0.0  # just before: the machine is noisy
                best = 0.0
                with Busy() if busy else contextlib.nullcontext() as b:
                    for _ in range(args.reps):
                        out[:] = 0
                        n0, t = (b.steps if b else 0), time.perf_counter()
                        fn()
                        took = time.perf_counter() - t
                        best = max(best, nbytes / took / 2**30)
                        if b:  # the busy thread's pace while this way read, as a share of its pace alone
                            kept = max(kept, (b.steps - n0) / took / pace)
                if name not in ("plain async", "plain threads", "native threads"):
                    assert np.array_equal(out, data), name
                rates.append(best)
            print(f"  {name:22s} alone {rates[0]:5.2f}  next to a busy thread {rates[1]:5.2f}  "
                  f"busy thread's pace kept {kept:4.2f}", flush=True)
        if args.order:
            sys.setswitchinterval(2e-4)  # as the engine sets it while it reads (switch_interval)
            print(f"layer order, next to a busy thread, 0.2 ms switch interval: GiB/s, ms to layers 0 / 1 / last, stall of a "
                  f"{args.t_layer:g} ms/layer forward (ms); median of {args.reps + 1}", flush=True)
            for mib in (16, 8, 4, 2):
                p = plan_fetch(plan.objects, plan.n_layers, mib << 20, 1 if mib > 2 else 0)
                for name, get in (("obstore + copy", obstore_get), ("native + copy", native_get)):
                    rows = []
                    with Busy():
                        for _ in range(args.reps + 1):
                            out[:] = 0
                            t0 = time.perf_counter()
                            ended = copy_run(get, p)
                            took = time.perf_counter() - t0
                            assert np.array_equal(out, data), name
                            ready = layer_times(p.reads, ended, t0, plan.n_layers)
                            rows.append((nbytes / took / 2**30, ready[0], ready[1], ready[-1],
                                         stall(ready, args.t_layer)))
                    med = [sorted(col)[len(col) // 2] for col in zip(*rows)]
                    print(f"  {mib:2d} MiB ranges ({len(p.reads):3d} reads)  {name:15s} {med[0]:5.2f} GiB/s  "
                          f"{med[1]:6.1f} / {med[2]:6.1f} / {med[3]:6.1f} ms  stall {med[4]:6.1f} ms", flush=True)
        raw.close()
    finally:
        for c in caches.values():
            c.close()
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
