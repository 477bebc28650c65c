"""When do the first layers land? Plans and receive paths side by side.

A layer-wise forward can start layer l only once layer l of every page is in host memory. With
layer groups of `read_range_bytes` (16 MiB = 8 layers of an 8-page Llama-3.1-8B object) received
whole (`native_receive: staging`), that is a whole group of every object; `first_range_layers: 1`
brings layer 0 of every object first in ranges of its own (more requests); received piece by piece
(`native_receive: pieces`, the default), each layer of a range counts as soon as its pieces are in
place, with no more requests; `first_layer_hold` also holds the ranges after the first ones until
layer 0 is in; `read_waves` cuts a small prefix into ranges of a few layers, several per
connection, so that the layers in flight together stay a narrow band. This reads the same prefix
with each way, in turn, under a bandwidth cap (the scheduler's token bucket, so the transfer and not
this machine decides) or none, into an array of targets as SGLang's pools give it, and prints when
layers 0 and 1 and the last layer were ready, the request counts, and when a forward pass of
`--t-layer` ms per layer, started with the fetch and waiting for each layer, would end (and how long
after the last byte: the tail a hit-heavy prefill adds to the read).

    python benchmarks/first_layer.py --pages 128 --bandwidth 512MiB --reps 3
    python benchmarks/first_layer.py --pages 64 --bandwidth 0 --t-layer 7 --reps 5   # a 4K prefix
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

from transports import LAYERS, PIECE, llama_fingerprint, page_keys, segments_of, table_of  # noqa: E402


def forward_end(ready: list[float], t_layer: float) -> float:
    """When a forward pass of t_layer per layer, started with the fetch, ends if layer l can start
    only once layer l has landed (seconds after the fetch began)."""
    t = 0.0
    for r in ready:
        t = max(t, r) + t_layer
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=128, help="8 MiB pages (128 = 1 GiB, a 8K-token prefix)")
    ap.add_argument("--bandwidth", default="512MiB", help="the read cap; 0 for none")
    ap.add_argument("--range", default="16MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--t-layer", type=float, default=7.0, help="the modelled forward's ms per layer (a 4K "
                    "hit-heavy forward takes about 0.6x the read on the H100; 7 ms keeps that ratio here)")
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
        cap = 0 if args.bandwidth in ("0", "none") else args.bandwidth
        ways = {"whole ranges (staging)": {"native_receive": "staging", "first_layer_hold": 0},
                "first_range_layers=1 (staging)": {"native_receive": "staging", "first_range_layers": 1,
                                                   "first_layer_hold": 0},
                "per layer (pieces), no hold": {"first_layer_hold": 0},
                "per layer + first_layer_hold (default)": {},
                "per layer + read_waves 4, no hold": {"read_waves": 4, "first_layer_hold": 0}}

        def config(way: dict):
            """A way's keys: `native_receive` goes to the tier, the rest to the top level."""
            top = {k: v for k, v in way.items() if k != "native_receive"}
            receive = way.get("native_receive", "pieces")
            return parse_config({"tiers": [{**tier, "native_receive": receive}], "bandwidth": cap,
                                 "read_range_bytes": args.range, **top})
        caches = {name: ObjectCache(config(kw), fp) for name, kw in ways.items()}
        res: dict[str, list] = {name: [] for name in ways}
        try:
            for rep in range(args.reps):
                for name in ways if rep % 2 == 0 else reversed(ways):
                    out = np.zeros_like(data)
                    f = caches[name].fetch(keys, table_of(out), streamed=True)  # as SGLang's layer-wise path
                    assert all(f.wait(120)) and np.array_equal(out, data)
                    at = [t - f.started for t in f.readiness.ready_at]
                    res[name].append((at[0], at[1], at[-1], len(f.plan.reads), forward_end(at, args.t_layer / 1e3)))
        finally:
            for c in caches.values():
                c.close()
        print(f"{args.pages} pages ({args.pages * LAYERS * PIECE / 2**30:.2f} GiB), {args.range} ranges, "
              f"cap {args.bandwidth}, {args.reps} reps each (median), ms after the fetch began:")
        base = None
        for name, rows in res.items():
            first, second, last, reqs, end = (statistics.median(r[i] for r in rows) for i in range(5))
            base = base or (first, second, last, end)
            print(f"  {name:40s} layer 0 {first * 1e3:7.1f}  layer 1 {second * 1e3:7.1f}  all {last * 1e3:7.1f}  "
                  f"({first / base[0]:.2f} / {second / base[1]:.2f} / {last / base[2]:.2f} of the first)  "
                  f"{reqs:.0f} requests  forward ends {end * 1e3:7.1f} ({end / base[3]:.2f}; "
                  f"+{(end - last) * 1e3:.1f} after the last byte)")
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
