"""Scheduler benchmark, fluid-model part: sharing policies under one bandwidth cap.

Llama-3.1-8B geometry (32 layers, 256 KiB per page per layer, 8-page objects read in 8 MiB layer
groups, exactly as engine/plan.py plans them), per-layer compute modelled from the H200 numbers in
the shared GPU notes, suffixes of 64 and 2048 new tokens. Cases: n = 2, 4, 8 concurrent requests
with equal 4K prefixes and with mixed prefixes (1K-16K), arriving together and staggered. For each
policy: mean and p90 added TTFT over the no-transfer bound, time to first layer, and the ratio to
`fair`, next to the best one-at-a-time order the model finds (the optimum for equal requests
arriving together).

With --real, every case also runs over real transfers: a local SeaweedFS (started here), one stored
prefix that every request reads its share of into the same destination buffers (checked byte for
byte after every run, then cleared), the cap enforced by the scheduler's token bucket, and a
consumer per request that computes layer l for its modelled time once layer l is ready. Each case
runs --reps times per policy (policies in rotating order); the table gives the median of the
repetitions with their min-max, next to the model of the same inputs. To fit this 2-core machine
in about 15 minutes, --real divides every prefix by 4 by default (--scale): equal 1K prefixes, mixed
256 to 4K tokens; the model rows printed are then for those same inputs.

    python benchmarks/scheduler.py [--cap-gib 4]                         # model only, full sizes
    python benchmarks/scheduler.py --real --cap-gib 0.25 [--reps 3] [--scale 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # fluid.py: the fluid model
sys.path.insert(0, os.path.join(ROOT, "tests"))  # testbed: local S3 servers

from sglang_objectcache.engine.index import ObjectInfo  # noqa: E402
from sglang_objectcache.engine.plan import PlannedObject, plan_fetch  # noqa: E402
from sglang_objectcache.engine.policy import POLICIES, Policy, RequestState, Serial  # noqa: E402

from fluid import best_serial, mean_added, simulate  # noqa: E402

LAYERS, PIECE, PAGE_TOKENS, PAGES_PER_OBJECT = 32, 256 << 10, 64, 8
RANGE = 8 << 20
# Full prefill of one layer on the H200: 2.9 ms at 4K tokens, 108.6 ms at 64K; fitted as
# alpha*n + beta*n^2, plus a 0.4 ms floor for a short suffix (0.42 ms measured at <= 128 tokens).
ALPHA, BETA, FLOOR = 6.45e-7, 1.545e-11, 0.4e-3


def t_layer(prefix: int, suffix: int) -> float:
    """Modelled compute of one layer for `suffix` new tokens over a cached `prefix`."""
    return FLOOR + ALPHA * suffix + 2 * BETA * suffix * (prefix + suffix / 2)


def request(name: str, prefix: int, suffix: int, arrival: float, compute_prefix: int | None = None) -> RequestState:
    """The first `prefix` tokens of a longer stored prefix (full 8-page objects, as in the real run):
    a request that ends inside an object reads whole layer blocks of it (engine/plan.py), so a
    256-token prefix (4 pages) reads the 64 MiB of its 8-page object. `compute_prefix`: the prefix
    its compute is modelled for, where that differs (an unscaled request of a scaled run)."""
    pages = prefix // PAGE_TOKENS
    objects = []
    for i in range(0, pages, PAGES_PER_OBJECT):
        n = min(PAGES_PER_OBJECT, pages - i)
        info = ObjectInfo(f"{name}/{i}", PAGES_PER_OBJECT, LAYERS, PIECE, 4096)
        objects.append(PlannedObject(None, info, i, list(range(n))))
    plan = plan_fetch(objects, LAYERS, RANGE)
    r = RequestState(name, arrival, [(r.nbytes, r.l0, r.l1) for r in plan.reads], LAYERS,
                     t_layer(prefix if compute_prefix is None else compute_prefix, suffix))
    r.prefix = prefix  # tokens, for the real run
    return r


MIXED = [1024, 16384, 4096, 2048, 8192, 1024, 16384, 4096]


def cases(cap: float, scale: int = 1) -> dict[str, list[RequestState]]:
    """The issue's 24 cases; `scale` divides every prefix (the real run's size knob)."""
    out = {}
    for suffix in (64, 2048):
        for n in (2, 4, 8):
            for mix in ("equal", "mixed"):
                for arrive in ("together", "staggered"):
                    prefixes = [p // scale for p in ([4096] * n if mix == "equal" else MIXED[:n])]
                    # staggered: one arrival every 1/(2n) of the whole transfer time
                    gap = 0.0 if arrive == "together" else sum(prefixes) * 128 * 1024 / cap / (2 * n)
                    out[f"{mix} {arrive} n={n} suffix={suffix}"] = [
                        request(f"r{i}", p, suffix, i * gap) for i, p in enumerate(prefixes)]
    # where compute leaves room: a long new prompt over a shorter stored prefix (4K + 64K new tokens:
    # about 117 ms a layer, its prefix loads in a fraction of that) beside transfer-bound requests
    # with 8K prefixes and 64-token questions. The compute is modelled for the unscaled sizes.
    for arrive in ("together", "staggered"):
        for n_short in (1, 3):
            reqs = [request("long", 4096 // scale, 65536, 0.0, compute_prefix=4096)]
            gap = 0.0 if arrive == "together" else 8192 // scale * 128 * 1024 / cap / 4
            reqs += [request(f"r{i}", 8192 // scale, 64, (i + 1) * gap) for i in range(n_short)]
            out[f"room {arrive} n={n_short + 1}"] = reqs
    return out


POLS = ("fair", "srpt", "slack")


class _Order(Serial):
    """All bandwidth to the first request of a fixed order that is still active."""

    name = "fixed-order"

    def __init__(self, order):
        self.rank = {n: i for i, n in enumerate(order)}

    def key(self, r, now, rate):
        return self.rank[r.name]


def best_one_at_a_time(reqs: list[RequestState], cap: float) -> tuple[float, str]:
    """The model's best mean added TTFT over orders of serving requests one at a time: every order
    for n <= 5; for n = 8 the one order when the requests are identical (all orders are equal), else
    a pairwise-swap local search from the shortest-first and arrival orders (an upper bound)."""
    names = [r.name for r in reqs]
    if len(reqs) <= 5:
        return best_serial(reqs, cap, max_requests=5)[0], "all orders"
    run = lambda order: mean_added(simulate(reqs, cap, _Order(order))[0])  # noqa: E731
    if all((r.reads, r.t_layer, r.arrival) == (reqs[0].reads, reqs[0].t_layer, reqs[0].arrival) for r in reqs):
        return run(names), "equal requests"
    best = float("inf")
    for start in (sorted(names, key=lambda n: next(r.bytes_left for r in reqs if r.name == n)), names):
        order, cur = list(start), run(start)
        improved = True
        while improved:
            improved = False
            for i in range(len(order)):
                for j in range(i + 1, len(order)):
                    cand = list(order)
                    cand[i], cand[j] = cand[j], cand[i]
                    m = run(cand)
                    if m < cur - 1e-9:
                        order, cur, improved = cand, m, True
        best = min(best, cur)
    return best, "local search"


def decisions_differ(reqs: list[RequestState], cap: float) -> tuple[int, int]:
    """In the model under slack: at how many of its decisions srpt would have chosen another request."""
    slack, srpt = POLICIES["slack"], POLICIES["srpt"]
    count = [0, 0]

    class Both(Policy):
        def shares(self, active, now, rate):
            a = slack.shares(active, now, rate)
            count[0] += a != srpt.shares(active, now, rate)
            count[1] += 1
            return a

    simulate(reqs, cap, Both())
    return count[0], count[1]


def real_run(reqs: list[RequestState], prefixes: list[int], cap: float, policy: str,
             srv, prefix_ns: str, keys: list[str], dst) -> dict:
    """One case, one policy, over real transfers: per-request added TTFT and first layer, GiB/s."""
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
    errors: list[str] = []
    t0 = _time.monotonic() + 0.05

    def one(i: int) -> None:
        try:
            r = reqs[i]
            delay = t0 + r.arrival - _time.monotonic()
            if delay > 0:
                _time.sleep(delay)
            start = _time.monotonic()
            f = cache.fetch(keys[:prefixes[i] // PAGE_TOKENS], seg, t_layer=r.t_layer)
            first = None
            for layer in range(LAYERS):
                if not f.readiness.wait(layer, 600):
                    raise RuntimeError(f"request {i} failed: {f.readiness.failed}")
                if first is None:
                    first = _time.monotonic() - start
                _time.sleep(r.t_layer)  # the modelled forward pass of this layer
            end = _time.monotonic()
            if not all(f.wait(60)):
                raise RuntimeError(f"request {i}: pages missing")
            out[i] = {"added": end - start - LAYERS * r.t_layer, "first_layer": first, "end": end,
                      "bytes": f.plan.nbytes}
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache.close()
    if errors:
        raise RuntimeError("; ".join(errors))
    added = [o["added"] for o in out]
    span = max(o["end"] for o in out) - t0
    return {"mean": sum(added) / len(added), "p90": p90(added), "added": added,
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


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def summarize(runs: list[dict]) -> dict:
    """Median over repetitions of each metric, and the min-max of the mean added TTFT."""
    means = [r["mean"] for r in runs]
    return {"mean": median(means), "mean_min": min(means), "mean_max": max(means),
            "spread": (max(means) - min(means)) / median(means),
            **{k: median([r[k] for r in runs]) for k in ("p90", "first_layer", "gibps")}}


FP = None  # set by run_real


def run_real(cap_gib: float, scale: int, reps: int, model_rows: dict) -> list[dict]:
    """Every case over real transfers, `reps` times (the policies in rotating order within each
    repetition), next to the model numbers and the model's best one-at-a-time order."""
    global FP
    import time as _time

    import numpy as np

    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    from sglang_objectcache.keys import Fingerprint
    from testbed import servers

    cap = cap_gib * (1 << 30)
    FP = Fingerprint("sched-bench", "bfloat16", PAGE_TOKENS, LAYERS, 0, PIECE, "mha", 8, 128, 128, 0, 1)
    pages = max(MIXED) // scale // PAGE_TOKENS
    srv = servers.start_seaweedfs(memory_limit_mb=None)  # its temp dir goes when it stops
    os.environ.update(srv.env())
    rows = []
    t_start = _time.monotonic()
    try:
        src = np.random.default_rng(0).integers(0, 256, size=(pages, LAYERS, PIECE), dtype=np.uint8)
        keys = [f"{i:064x}" for i in range(pages)]
        w = ObjectCache(parse_config({"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket,
                                                 "prefix": "sched"}]}), FP)
        print(f"\nwriting one {max(MIXED) // scale // 1024}K-token prefix ({pages * 8} MiB) ...", flush=True)
        for i in range(0, pages, 128):
            assert all(w.put(keys[i:i + 128], segments_into(src[i:i + 128])))
        w.close()
        dst = np.zeros_like(src)
        print(f"\nreal transfers, cap {cap_gib} GiB/s, prefixes / {scale}, {reps} repetitions: mean added TTFT "
              "ms, median of repetitions [min-max]; model in brackets\n", flush=True)
        print("| case | fair | srpt | slack | model optimum | fair/slack | slack/srpt | slack/opt | noise |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, reqs in cases(cap, scale).items():
            if name not in model_rows:
                continue
            prefixes = [r.prefix for r in reqs]
            n_pages = max(prefixes) // PAGE_TOKENS
            runs = {p: [] for p in POLS}
            t_case = _time.monotonic()
            for rep in range(reps):
                for pol in POLS[rep % 3:] + POLS[:rep % 3]:  # rotate which policy goes first
                    runs[pol].append(real_run(reqs, prefixes, cap, pol, srv, "sched", keys, dst))
                    # every request of the run wrote its pages into the same buffers: check, then clear
                    if not np.array_equal(dst[:n_pages], src[:n_pages]):
                        raise AssertionError(f"{name} {pol}: bytes differ")
                    dst[:n_pages] = 0
            res = {p: summarize(runs[p]) for p in POLS}
            mr = model_rows[name]
            opt = mr["best_serial"]
            noise = max(res["srpt"]["spread"], res["slack"]["spread"])
            rows.append({"case": name, "prefixes": prefixes, "real": res, "runs": runs,
                         "model": mr["policies"], "best_serial": opt, "best_serial_how": mr["best_serial_how"],
                         "noise": noise, "seconds": _time.monotonic() - t_case,
                         "model_differ": mr["slack_srpt_decisions_differ"]})
            cell = lambda p, res=res, mr=mr: (f"{res[p]['mean'] * 1e3:.0f} [{res[p]['mean_min'] * 1e3:.0f}-"  # noqa: E731
                              f"{res[p]['mean_max'] * 1e3:.0f}] ({mr['policies'][p]['mean'] * 1e3:.0f})")
            print(f"| {name} | {cell('fair')} | {cell('srpt')} | {cell('slack')} | {opt * 1e3:.0f} | "
                  f"{res['fair']['mean'] / res['slack']['mean']:.2f} "
                  f"({mr['policies']['fair']['mean'] / mr['policies']['slack']['mean']:.2f}) | "
                  f"{res['slack']['mean'] / res['srpt']['mean']:.3f} | {res['slack']['mean'] / opt:.3f} | "
                  f"{noise * 100:.1f}% |", flush=True)
        print("\nbytes equal: True (every run checked)")
    finally:
        srv.stop()
    print(f"\nreal run: {(_time.monotonic() - t_start) / 60:.1f} min\n")
    print("per policy, median of repetitions: p90 added TTFT ms / time to first layer ms / achieved GiB/s\n")
    print("| case | fair | srpt | slack |")
    print("|---|---|---|---|")
    for row in rows:
        r = row["real"]
        print(f"| {row['case']} | " + " | ".join(
            f"{r[p]['p90'] * 1e3:.0f} / {r[p]['first_layer'] * 1e3:.0f} / {r[p]['gibps']:.3f}" for p in POLS) + " |")
    goals(rows)
    return rows


def goals(rows: list[dict]) -> None:
    noises = sorted(r["noise"] for r in rows)
    print(f"\nnoise: spread (max-min)/median of the mean added TTFT over repetitions, srpt and slack: "
          f"median {median(noises) * 100:.1f}%, max {noises[-1] * 100:.1f}% over {len(rows)} cases")
    ratios = sorted(r["real"]["slack"]["mean"] / r["real"]["srpt"]["mean"] for r in rows)
    print(f"slack/srpt, median of repetitions: {ratios[0]:.3f} to {ratios[-1]:.3f} (median {median(ratios):.3f}) "
          f"over {len(rows)} cases; in the model the two decide differently in "
          f"{sum(1 for r in rows if r['model_differ'][0])} of them")
    eq = [r for r in rows if r["case"].startswith("equal together")]
    rest = [r for r in rows if not r["case"].startswith("equal together")]
    if not eq or not rest:
        return
    worst = max(eq, key=lambda r: r["real"]["slack"]["mean"] / r["best_serial"])
    ok = all(r["real"]["slack"]["mean"] <= 1.05 * r["best_serial"] for r in eq)
    print(f"goal 1 (equal, together: slack's mean within 5% of the one-at-a-time optimum): "
          f"{'met' if ok else 'NOT met'}; worst {worst['case']}: "
          f"{worst['real']['slack']['mean'] / worst['best_serial']:.3f}x")
    bad = [r for r in rest if r["real"]["slack"]["mean"] > r["real"]["srpt"]["mean"] * (1 + r["noise"])]
    worst = max(rest, key=lambda r: r["real"]["slack"]["mean"] / r["real"]["srpt"]["mean"])
    print(f"goal 2 (mixed or staggered: slack at least as good as srpt, within that case's noise): "
          f"{'met' if not bad else 'NOT met'}: met in {len(rest) - len(bad)} of {len(rest)} cases; worst "
          f"{worst['case']}: slack/srpt {worst['real']['slack']['mean'] / worst['real']['srpt']['mean']:.3f} "
          f"(noise {worst['noise'] * 100:.1f}%)")
    for r in bad:
        print(f"  beyond noise: {r['case']}: slack/srpt "
              f"{r['real']['slack']['mean'] / r['real']['srpt']['mean']:.3f}, noise {r['noise'] * 100:.1f}%")
    m_bad = [r for r in rest if r["model"]["slack"]["mean"] > r["model"]["srpt"]["mean"] * 1.001]
    print(f"model: slack <= srpt in {len(rest) - len(m_bad)} of {len(rest)} mixed/staggered cases"
          + "".join(f"; not in {r['case']}" for r in m_bad))


def plot_real(rows: list[dict], cap_gib: float, scale: int, path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5.5))
    x = range(len(rows))
    for k, pol in enumerate(POLS):
        med = [r["real"][pol]["mean"] * 1e3 for r in rows]
        lo = [m - r["real"][pol]["mean_min"] * 1e3 for m, r in zip(med, rows)]
        hi = [r["real"][pol]["mean_max"] * 1e3 - m for m, r in zip(med, rows)]
        ax.bar([i + (k - 1) * 0.27 for i in x], med, 0.27, yerr=[lo, hi], capsize=2, label=f"{pol} (real)")
    ax.scatter(list(x), [r["best_serial"] * 1e3 for r in rows], marker="_", s=300, color="k", zorder=3,
               label="model: best one-at-a-time")
    _finish_plot(fig, ax, rows, "mean added TTFT, ms (median of repetitions, min-max bars)",
                 f"Real transfers through a {cap_gib:g} GiB/s cap, SeaweedFS on loopback, prefixes / {scale}", path)


def _finish_plot(fig, ax, rows: list[dict], ylabel: str, title: str, path: str) -> None:
    """Case names under the bars, labels, legend, file."""
    ax.set_xticks(list(range(len(rows))))
    ax.set_xticklabels([r["case"].replace(" suffix=", "\ns=") for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gib", type=float, default=4.0, help="shared bandwidth cap, GiB/s")
    ap.add_argument("--real", action="store_true", help="also run every case over real transfers")
    ap.add_argument("--scale", type=int, default=None,
                    help="divide every prefix by this (default 1; 4 with --real, to fit 15 minutes here)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each real case and policy")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--png", default=None, help="plot (default results/scheduler-{model,real}.png)")
    ap.add_argument("--out", default=None, help="JSON (default results/scheduler-{model,real}.json)")
    args = ap.parse_args(argv)
    scale = args.scale or (4 if args.real else 1)
    kind = "real" if args.real else "model"
    png = args.png or os.path.join(ROOT, "results", f"scheduler-{kind}.png")
    out_path = args.out or os.path.join(ROOT, "results", f"scheduler-{kind}.json")
    cap = args.cap_gib * (1 << 30)
    rows = []
    print(f"fluid model, cap {args.cap_gib} GiB/s, prefixes / {scale}; added TTFT in ms (mean / p90), "
          "first layer ms (mean)\n")
    print("| case | fair | srpt | slack | best one-at-a-time | fair/slack | srpt/slack | slack != srpt |")
    print("|---|---|---|---|---|---|---|---|")
    for name, reqs in cases(cap, scale).items():
        if args.only not in name:
            continue
        res = {}
        for pol in POLS:
            out, _ = simulate(reqs, cap, POLICIES[pol])
            added = [o.added for o in out]
            res[pol] = {"mean": sum(added) / len(added), "p90": p90(added),
                        "first_layer": sum(o.first_layer for o in out) / len(out)}
        best, how = best_one_at_a_time(reqs, cap)
        differ = decisions_differ(reqs, cap)
        rows.append({"case": name, "policies": res, "best_serial": best, "best_serial_how": how,
                     "slack_srpt_decisions_differ": differ})
        fmt = lambda r: f"{r['mean'] * 1e3:.0f} / {r['p90'] * 1e3:.0f} ({r['first_layer'] * 1e3:.0f})"  # noqa: E731
        print(f"| {name} | {fmt(res['fair'])} | {fmt(res['srpt'])} | {fmt(res['slack'])} | "
              f"{best * 1e3:.0f} ({how}) | "
              f"{res['fair']['mean'] / res['slack']['mean']:.2f} | {res['srpt']['mean'] / res['slack']['mean']:.2f} | "
              f"{differ[0]} of {differ[1]} |", flush=True)
    real_rows = run_real(args.cap_gib, scale, args.reps, {r["case"]: r for r in rows}) if args.real else []
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"cap_gib": args.cap_gib, "scale": scale, "reps": args.reps if args.real else 0,
                   "rows": rows, "real": real_rows}, f, indent=1)
    print(f"\nresults: {out_path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return 0
    if real_rows:
        plot_real(real_rows, args.cap_gib, scale, png)
    else:
        fig, ax = plt.subplots(figsize=(12, 5))
        x = range(len(rows))
        for k, pol in enumerate(POLS):
            ax.bar([i + (k - 1) * 0.27 for i in x], [r["policies"][pol]["mean"] * 1e3 for r in rows], 0.27,
                   label=pol)
        _finish_plot(fig, ax, rows, "mean added TTFT, ms (fluid model)",
                     f"Sharing a {args.cap_gib:g} GiB/s cap: Llama-3.1-8B, 8-page objects, H200-modelled compute", png)
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
