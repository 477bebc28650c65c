"""What streamed loads cost their forwards, read back from a server's DEBUG log.

Each streamed prefill batch logs (`sglang/load_or_recompute.py`, at DEBUG) its new tokens, the
tokens it loaded, its forward time, its wait for bytes and the prefill model's compute for it.
This prints them per log, with the fit the decision makes of them (`LoadCost`), and beside them
what the GPU did in those prefills (`sglang/layerwise.py`'s GPU timeline line: the layer copies'
own time and how long the forward's stream waited on them):

    python benchmarks/gpu/load_cost.py /tmp/live/sglang-objectcache.log [more logs]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sglang_objectcache.engine.decide import LoadCost  # noqa: E402

LINE = re.compile(r"streamed batch of (\d+) new tokens over (\d+) loaded: forward ([\d.]+) ms, waited for "
                  r"bytes ([\d.]+) ms, modelled compute ([\d.]+) ms; the load cost (-?[\d.]+) ms")
GPU = re.compile(r"streamed prefill on the GPU: (\d+) layer copies took ([\d.]+) ms over a span of ([\d.]+) ms; "
                 r"the forward reached layer 0 (-?[\d.]+) ms after the first copy began and waited ([\d.]+) ms")


def _matches(path: str, pattern: re.Pattern) -> list[re.Match]:
    with open(path, errors="replace") as f:
        return [m for m in map(pattern.search, f) if m]


def parse_gpu(path: str) -> list[tuple[float, float, float]]:
    """(copies ms, span ms, forward's wait for copies ms) per streamed prefill."""
    return [(float(m[2]), float(m[3]), float(m[5])) for m in _matches(path, GPU)]


def parse(path: str) -> list[tuple[int, int, float, float, float, float]]:
    """(new tokens, loaded tokens, forward ms, waited ms, compute ms, cost ms) per streamed batch."""
    return [(int(m[1]), int(m[2]), *map(float, m.groups()[2:])) for m in _matches(path, LINE)]


def report(path: str) -> dict:
    rows = parse(path)
    out = {"log": path, "batches": len(rows)}
    gpu = parse_gpu(path)
    if gpu:
        out["gpu_ms"] = {k: statistics.median(g[i] for g in gpu) for i, k in enumerate(("copies", "span", "waited"))}
        out["gpu_n"] = len(gpu)
    if not rows:
        return out
    cost = LoadCost(keep=len(rows), forget=float("inf"))
    for new, loaded, *_, c in rows:
        cost.observe(loaded, c / 1e3)
    fit = cost.coefficients()
    out["cost_ms"] = {"min": min(r[5] for r in rows), "median": statistics.median(r[5] for r in rows),
                      "max": max(r[5] for r in rows)}
    if fit:
        out["fit"] = {"fixed_ms": fit[0] * 1e3, "per_1k_tokens_ms": fit[1] * 1e6}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+")
    args = ap.parse_args(argv)
    print("| log | streamed batches | load cost ms min / median / max | fit: fixed ms + ms per 1K tokens loaded "
          "| GPU, medians: copies ms / span ms / forward waited ms (n) |")
    print("|---|---|---|---|---|")
    for path in args.logs:
        r = report(path)
        c, f, g = r.get("cost_ms"), r.get("fit"), r.get("gpu_ms")
        print(f"| {os.path.basename(path)} | {r['batches']} | "
              + (f"{c['min']:.0f} / {c['median']:.0f} / {c['max']:.0f}" if c else "-") + " | "
              + (f"{f['fixed_ms']:.1f} + {f['per_1k_tokens_ms']:.1f}" if f else "-") + " | "
              + (f"{g['copies']:.1f} / {g['span']:.1f} / {g['waited']:.1f} ({r['gpu_n']})" if g else "-") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
