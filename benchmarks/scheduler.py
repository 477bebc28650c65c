"""Scheduler benchmark, fluid-model part: sharing policies under one bandwidth cap.

Llama-3.1-8B geometry (32 layers, 256 KiB per page per layer, 8-page objects read in 8 MiB layer
groups, exactly as engine/plan.py plans them), per-layer compute modelled from the H200 numbers in
the shared GPU notes, suffixes of 64 and 2048 new tokens. Cases: n = 2, 4, 8 concurrent requests
with equal 4K prefixes and with mixed prefixes (1K-16K), arriving together and staggered. For each
policy: mean and p90 added TTFT over the no-transfer bound, time to first layer, and the ratio to
`fair`, next to the best one-at-a-time order the model finds (the optimum for equal requests
arriving together). The real-transfer run of the same cases is not part of this script yet.

    python benchmarks/scheduler.py [--cap-gib 4] [--png results/scheduler.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sglang_objectcache.engine.fluid import best_serial, simulate  # noqa: E402
from sglang_objectcache.engine.index import ObjectInfo  # noqa: E402
from sglang_objectcache.engine.plan import PlannedObject, plan_fetch  # noqa: E402
from sglang_objectcache.engine.policy import POLICIES, RequestState  # noqa: E402

LAYERS, PIECE, PAGE_TOKENS, PAGES_PER_OBJECT = 32, 256 << 10, 64, 8
RANGE = 8 << 20
# Full prefill of one layer on the H200: 2.9 ms at 4K tokens, 108.6 ms at 64K; fitted as
# alpha*n + beta*n^2, plus a 0.4 ms floor for a short suffix (0.42 ms measured at <= 128 tokens).
ALPHA, BETA, FLOOR = 6.45e-7, 1.545e-11, 0.4e-3


def t_layer(prefix: int, suffix: int) -> float:
    """Modelled compute of one layer for `suffix` new tokens over a cached `prefix`."""
    return FLOOR + ALPHA * suffix + 2 * BETA * suffix * (prefix + suffix / 2)


def request(name: str, prefix: int, suffix: int, arrival: float) -> RequestState:
    pages = prefix // PAGE_TOKENS
    objects = []
    for i in range(0, pages, PAGES_PER_OBJECT):
        n = min(PAGES_PER_OBJECT, pages - i)
        info = ObjectInfo(f"{name}/{i}", tuple(range(n)), LAYERS, PIECE, 4096, bytes(8 * LAYERS * n))
        objects.append(PlannedObject(None, info, i, list(range(n))))
    plan = plan_fetch(objects, LAYERS, RANGE)
    return RequestState(name, arrival, [(r.nbytes, r.l0, r.l1) for r in plan.reads], LAYERS,
                        t_layer(prefix, suffix))


MIXED = [1024, 16384, 4096, 2048, 8192, 1024, 16384, 4096]


def cases(cap: float) -> dict[str, list[RequestState]]:
    out = {}
    for suffix in (64, 2048):
        for n in (2, 4, 8):
            for mix in ("equal", "mixed"):
                for arrive in ("together", "staggered"):
                    prefixes = [4096] * n if mix == "equal" else MIXED[:n]
                    # staggered: one arrival every 1/(2n) of the whole transfer time
                    gap = 0.0 if arrive == "together" else sum(prefixes) * 128 * 1024 / cap / (2 * n)
                    out[f"{mix} {arrive} n={n} suffix={suffix}"] = [
                        request(f"r{i}", p, suffix, i * gap) for i, p in enumerate(prefixes)]
    return out


REAL_CASES = ["equal together n=2 suffix=64", "equal together n=4 suffix=64", "mixed staggered n=4 suffix=64",
              "equal together n=2 suffix=2048", "equal together n=4 suffix=2048",
              "mixed staggered n=4 suffix=2048"]


def real_run(reqs: list[RequestState], prefixes: list[int], suffix: int, cap: float, policy: str,
             srv, prefix_ns: str, keys: list[str], dst) -> dict:
    """One case, one policy, over real transfers. Returns mean/p90 added TTFT, first layer, GiB/s."""
    import threading
    import time as _time

    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache

    cfg = parse_config({"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket,
                                   "prefix": prefix_ns}], "fetch_policy": policy,
                        "bandwidth": int(cap), "timeout": 600})
    cache = ObjectCache(cfg, FP)
    seg = segments_into(dst)
    out: list[dict] = [None] * len(reqs)
    t0 = _time.monotonic() + 0.05

    def one(i: int) -> None:
        r = reqs[i]
        delay = t0 + r.arrival - _time.monotonic()
        if delay > 0:
            _time.sleep(delay)
        start = _time.monotonic()
        n = prefixes[i] // PAGE_TOKENS
        f = cache.fetch(keys[:n], seg, t_layer=r.t_layer)
        first = None
        for layer in range(LAYERS):
            if not f.readiness.wait(layer, 600):
                raise RuntimeError(f"request {i} failed: {f.readiness.failed}")
            if first is None:
                first = _time.monotonic() - start
            _time.sleep(r.t_layer)  # the modelled forward pass of this layer
        end = _time.monotonic()
        assert all(f.wait(60))
        out[i] = {"added": end - start - LAYERS * r.t_layer, "first_layer": first, "end": end,
                  "bytes": f.plan.nbytes}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    added = [o["added"] for o in out]
    span = max(o["end"] for o in out) - t0
    return {"mean": sum(added) / len(added), "p90": p90(added),
            "first_layer": sum(o["first_layer"] for o in out) / len(out),
            "gibps": sum(o["bytes"] for o in out) / span / (1 << 30)}


def segments_into(dst):
    """Segments of page i of the stored prefix inside `dst` ([pages, layers, piece] uint8)."""
    base, half = dst.ctypes.data, PIECE // 2

    def seg(layer: int, i: int):
        a = base + (i * LAYERS + layer) * PIECE
        return [(a, half), (a + half, half)]

    return seg


def p90(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


FP = None  # set by run_real


def run_real(cap_gib: float, model_rows: dict) -> list[dict]:
    """The REAL_CASES over real transfers, each next to its model numbers."""
    global FP
    import numpy as np

    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    from sglang_objectcache.keys import Fingerprint
    from sglang_objectcache.testbed import servers

    cap = cap_gib * (1 << 30)
    FP = Fingerprint("sched-bench", "bfloat16", PAGE_TOKENS, LAYERS, 0, PIECE, "mha", 8, 128, 128, 0, 1)
    pages = max(MIXED) // PAGE_TOKENS
    srv = servers.start_seaweedfs(memory_limit_mb=None)  # its temp dir goes when it stops
    os.environ.update(srv.env())
    rows = []
    try:
        src = np.random.default_rng(0).integers(0, 256, size=(pages, LAYERS, PIECE), dtype=np.uint8)
        keys = [f"{i:064x}" for i in range(pages)]
        w = ObjectCache(parse_config({"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket,
                                                 "prefix": "sched"}]}), FP)
        print(f"\nwriting one {max(MIXED) // 1024}K-token prefix ({pages * 8} MiB) ...", flush=True)
        for i in range(0, pages, 128):
            assert all(w.put(keys[i:i + 128], segments_into(src[i:i + 128])))
        w.close()
        dst = np.zeros_like(src)
        print(f"\nreal transfers, cap {cap_gib} GiB/s: added TTFT ms mean / p90 (first layer ms), "
              "achieved GiB/s; model mean in brackets\n")
        print("| case | fair | srpt | slack | fair/slack real (model) |")
        print("|---|---|---|---|---|")
        all_cases = cases(cap)
        for name in REAL_CASES:
            reqs = all_cases[name]
            suffix = int(name.rsplit("=", 1)[1])
            prefixes = [int(round(r.bytes_left / (LAYERS * PIECE))) * PAGE_TOKENS for r in reqs]
            res = {pol: real_run(reqs, prefixes, suffix, cap, pol, srv, "sched", keys, dst)
                   for pol in ("fair", "srpt", "slack")}
            model = model_rows[name]["policies"]
            rows.append({"case": name, "real": res, "model": model})
            cell = lambda p: (f"{res[p]['mean'] * 1e3:.0f} / {res[p]['p90'] * 1e3:.0f} "  # noqa: E731
                              f"({res[p]['first_layer'] * 1e3:.0f}), {res[p]['gibps']:.2f} "
                              f"[{model[p]['mean'] * 1e3:.0f}]")
            print(f"| {name} | {cell('fair')} | {cell('srpt')} | {cell('slack')} | "
                  f"{res['fair']['mean'] / res['slack']['mean']:.2f} "
                  f"({model['fair']['mean'] / model['slack']['mean']:.2f}) |", flush=True)
        assert np.array_equal(dst, src), "bytes differ"
        print("\nbytes equal: True")
    finally:
        srv.stop()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gib", type=float, default=4.0, help="shared bandwidth cap, GiB/s")
    ap.add_argument("--png", default=os.path.join(ROOT, "results", "scheduler-model.png"))
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "scheduler-model.json"))
    ap.add_argument("--real", action="store_true", help="also run a subset of the cases over real transfers")
    args = ap.parse_args(argv)
    cap = args.cap_gib * (1 << 30)
    rows = []
    print(f"fluid model, cap {args.cap_gib} GiB/s; added TTFT in ms (mean / p90), first layer ms (mean)\n")
    print("| case | fair | srpt | slack | best one-at-a-time | fair/slack | srpt/slack |")
    print("|---|---|---|---|---|---|---|")
    for name, reqs in cases(cap).items():
        res = {}
        for pol in ("fair", "srpt", "slack"):
            out, _ = simulate(reqs, cap, POLICIES[pol])
            added = [o.added for o in out]
            res[pol] = {"mean": sum(added) / len(added), "p90": p90(added),
                        "first_layer": sum(o.first_layer for o in out) / len(out)}
        best = best_serial(reqs, cap, max_requests=8)[0] if len(reqs) <= 4 else None
        rows.append({"case": name, "policies": res, "best_serial": best})
        fmt = lambda r: f"{r['mean'] * 1e3:.0f} / {r['p90'] * 1e3:.0f} ({r['first_layer'] * 1e3:.0f})"  # noqa: E731
        print(f"| {name} | {fmt(res['fair'])} | {fmt(res['srpt'])} | {fmt(res['slack'])} | "
              f"{'-' if best is None else f'{best * 1e3:.0f}'} | "
              f"{res['fair']['mean'] / res['slack']['mean']:.2f} | {res['srpt']['mean'] / res['slack']['mean']:.2f} |")
    real_rows = run_real(args.cap_gib, {r["case"]: r for r in rows}) if args.real else []
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"cap_gib": args.cap_gib, "rows": rows, "real": real_rows}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(12, 5))
    x = range(len(rows))
    for k, pol in enumerate(("fair", "srpt", "slack")):
        ax.bar([i + (k - 1) * 0.27 for i in x], [r["policies"][pol]["mean"] * 1e3 for r in rows], 0.27, label=pol)
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["case"].replace(" suffix=", "\ns=") for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("mean added TTFT, ms (fluid model)")
    ax.set_title(f"Sharing a {args.cap_gib:g} GiB/s cap: Llama-3.1-8B, 8-page objects, H200-modelled compute")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"\nplot: {args.png}\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
