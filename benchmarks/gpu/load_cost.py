"""What streamed loads cost their forwards, read back from a server's DEBUG log.

Each streamed prefill batch logs (`sglang/load_or_recompute.py`, at DEBUG) its new tokens, the
tokens it loaded, its forward time, its wait for bytes and the prefill model's compute for it.
This prints them per log, with the fit the decision makes of them (`LoadCost`):

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


def parse(path: str) -> list[tuple[int, int, float, float, float, float]]:
    """(new tokens, loaded tokens, forward ms, waited ms, compute ms, cost ms) per streamed batch."""
    with open(path, errors="replace") as f:
        return [(int(m[1]), int(m[2]), *map(float, m.groups()[2:])) for m in map(LINE.search, f) if m]


def report(path: str) -> dict:
    rows = parse(path)
    out = {"log": path, "batches": len(rows)}
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
    print("| log | streamed batches | load cost ms min / median / max | fit: fixed ms + ms per 1K tokens loaded |")
    print("|---|---|---|---|")
    for path in args.logs:
        r = report(path)
        c, f = r.get("cost_ms"), r.get("fit")
        print(f"| {os.path.basename(path)} | {r['batches']} | "
              + (f"{c['min']:.0f} / {c['median']:.0f} / {c['max']:.0f}" if c else "-") + " | "
              + (f"{f['fixed_ms']:.1f} + {f['per_1k_tokens_ms']:.1f}" if f else "-") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
