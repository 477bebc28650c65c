"""When does layer 0 land? The plain plan against `first_range_layers: 1`, side by side.

A layer-wise forward can start layer 0 only once layer 0 of every page is in host memory. With
layer groups of `read_range_bytes` (16 MiB = 8 layers of an 8-page Llama-3.1-8B object), that is
a whole group of every object; with `first_range_layers: 1`, layer 0 of every object comes first
in ranges of its own. This reads the same prefix with both plans, alternating, under a bandwidth cap
(the scheduler's token bucket, so the transfer and not this machine decides), and prints when
layer 0 and the last layer were ready, and the request counts.

    python benchmarks/first_layer.py --pages 128 --bandwidth 512MiB --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from transports import LAYERS, PIECE, llama_fingerprint, page_keys, segments_of  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=128, help="8 MiB pages (128 = 1 GiB, a 8K-token prefix)")
    ap.add_argument("--bandwidth", default="512MiB", help="the read cap; 0 for none")
    ap.add_argument("--range", default="16MiB")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    from sglang_objectcache.testbed import servers

    srv = servers.start_seaweedfs(memory_limit_mb=None)
    os.environ.update(srv.env())
    try:
        tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": "fl"}
        fp = llama_fingerprint("first-layer")
        data = np.random.default_rng(0).integers(0, 256, size=(args.pages, LAYERS, PIECE), dtype=np.uint8)
        keys = page_keys(args.pages)
        w = ObjectCache(parse_config({"tiers": [tier]}), fp)
        assert all(w.put(keys, segments_of(data)))
        w.close()
        res: dict[int, list] = {0: [], 1: []}
        cap = 0 if args.bandwidth in ("0", "none") else args.bandwidth
        caches = {n: ObjectCache(parse_config({"tiers": [tier], "bandwidth": cap,
                                               "read_range_bytes": args.range, "first_range_layers": n}), fp)
                  for n in res}
        try:
            for rep in range(args.reps):
                for n in (0, 1) if rep % 2 == 0 else (1, 0):
                    out = np.zeros_like(data)
                    f = caches[n].fetch(keys, segments_of(out))
                    assert all(f.wait(120)) and np.array_equal(out, data)
                    at = [t - f.started for t in f.readiness.ready_at]
                    res[n].append((at[0], at[-1], len(f.plan.reads)))
        finally:
            for c in caches.values():
                c.close()
        print(f"{args.pages} pages ({args.pages * LAYERS * PIECE / 2**30:.2f} GiB), {args.range} ranges, "
              f"cap {args.bandwidth}, {args.reps} reps each (median):")
        med = {n: [statistics.median(r[i] for r in res[n]) for i in range(3)] for n in res}
        for n, (first, last, reqs) in med.items():
            print(f"  first_range_layers={n}: layer 0 ready {first * 1e3:8.1f} ms, all layers {last * 1e3:8.1f} ms, "
                  f"{reqs:.0f} requests")
        print(f"  layer 0 ratio {med[1][0] / med[0][0]:.2f}, all layers ratio {med[1][1] / med[0][1]:.2f}")
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
