"""How well the read meter predicts the next load, replayed from fetches measured inside SGLang.

Load or recompute compares an expected load time against an expected recompute time, so the
meter's error is the decision's error. This replays a recorded sequence of fetches (bytes and
seconds each, in order, as the objectcache servers of the GPU live benchmark logged them) through
`engine/decide.py`'s `ReadMeter` and through the estimator it replaced (a rate: bytes over busy
time, where a slower sample replaced it at once and faster ones were smoothed, alpha 0.3,
forgotten after 2 s), and prints, before each fetch, what each expected against what it took.

    python benchmarks/meter_replay.py                          # the H100 samples in docs/results
    python benchmarks/meter_replay.py --samples my-samples.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sglang_objectcache.engine.decide import ReadMeter  # noqa: E402

DEFAULT = os.path.join(ROOT, "docs", "results", "read-samples-h100-2026-12-07.json")


class RateMeter:
    """The estimator before: one rate, the worst news at once, good news smoothed."""

    def __init__(self, alpha: float = 0.3, forget: float = 2.0):
        self.alpha, self.forget, self.rate, self.updated = alpha, forget, None, None

    def seconds(self, nbytes: int, now: float) -> float | None:
        return None if self.rate is None else nbytes / self.rate

    def sample(self, nbytes: int, seconds: float, now: float) -> None:
        r = nbytes / seconds
        old = self.rate is None or now - self.updated > self.forget
        self.rate = r if old or r < self.rate else (1 - self.alpha) * self.rate + self.alpha * r
        self.updated = now


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def replay(rows: list) -> dict:
    clock = Clock()
    new, old = ReadMeter(clock=clock), RateMeter()
    out = {"new": [], "old": []}
    start = rows[0][0]
    for i, (sec, nbytes, took) in enumerate(rows):
        clock.t = max(clock.t, sec - start + i * 1e-3)  # the log's clock has whole seconds; keep order
        for name, pred in (("new", new.seconds(nbytes)), ("old", old.seconds(nbytes, clock.t))):
            if pred is not None:
                out[name].append((pred, took, nbytes))
        old.sample(nbytes, took, clock.t)
        new.started(i, nbytes)
        clock.t += took
        new.ended(i, nbytes)
    return out


def summary(pairs: list) -> dict:
    rel = [abs(p - t) / t for p, t, _ in pairs]
    return {"n": len(pairs), "sum_expected_over_sum_took": sum(p for p, _, _ in pairs) / sum(t for _, t, _ in pairs),
            "median_abs_rel_err": statistics.median(rel), "mean_abs_rel_err": statistics.fmean(rel),
            "over_2x": sum(p > 2 * t for p, t, _ in pairs), "under_half": sum(p < t / 2 for p, t, _ in pairs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", default=DEFAULT)
    args = ap.parse_args(argv)
    data = json.load(open(args.samples))
    pooled = {"new": [], "old": []}
    print(f"samples: {args.samples}\n")
    print("| run | meter | fetches predicted | expected / took (sums) | median abs error | mean abs error | "
          "over 2x | under 1/2 |")
    print("|---|---|---|---|---|---|---|---|")
    for run, rows in data["runs"].items():
        got = replay(rows)
        for name in ("old", "new"):
            pooled[name] += got[name]
            s = summary(got[name])
            print(f"| {run} | {name} | {s['n']} | {s['sum_expected_over_sum_took']:.2f} | "
                  f"{s['median_abs_rel_err']:.0%} | {s['mean_abs_rel_err']:.0%} | {s['over_2x']} | {s['under_half']} |")
    for name in ("old", "new"):
        s = summary(pooled[name])
        print(f"| all | {name} | {s['n']} | {s['sum_expected_over_sum_took']:.2f} | {s['median_abs_rel_err']:.0%} | "
              f"{s['mean_abs_rel_err']:.0%} | {s['over_2x']} | {s['under_half']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
