"""The replay's verdict: objectcache against each peer backend, per workload point, over repeated
runs, so that a user can tell a difference from noise.

A comparison counts only where both backends served the same requests from storage (the same
storage hit, request by request, in every run). Each run of a point runs every backend back to
back; the ratio objectcache/peer of that run's storage fetch mean is one sample. The verdict says
"faster" or "slower" only when every sample agrees; otherwise "within noise".
"""

from __future__ import annotations

import statistics

BASE = "objectcache"


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def median_row(rows: list[dict]) -> dict:
    """One summary row from repeated runs of one backend at one point: the median of each number."""
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = _median([r.get(k) for r in rows])
    out["runs"] = len(rows)
    return out


def compare(point: tuple[int, int], runs: dict[str, list[tuple[dict, tuple]]]) -> list[dict]:
    """Verdict rows for one point (prefix, concurrency). `runs`: backend -> per run, (summary row,
    the storage hit of each request in order)."""
    base = runs.get(BASE)
    out = []
    if not base:
        return out
    for peer, theirs in runs.items():
        if peer == BASE:
            continue
        row = {"peer": peer, "system_prompt_len": point[0], "concurrency": point[1], "runs": len(theirs),
               "storage_hit_requests": (base[0][0]["storage_hit_requests"], theirs[0][0]["storage_hit_requests"])}
        same = all(b[1] == t[1] for b, t in zip(base, theirs)) and len(base) == len(theirs)
        if not same:
            row["verdict"] = ("not comparable: the peer never read from storage"
                              if all(t[0]["storage_hit_requests"] == 0 for t in theirs)
                              else "not comparable: different requests hit storage")
            out.append(row)
            continue
        if row["storage_hit_requests"][0] == 0:
            row["verdict"] = "no storage hits at this point"
            out.append(row)
            continue
        for key, name in (("fetch_ms_mean", "fetch"), ("ttft_modelled_ms_mean", "ttft")):
            ratios = [b[0][key] / t[0][key] for b, t in zip(base, theirs) if b[0][key] and t[0][key]]
            row[f"{name}_ratios"] = ratios
            row[f"{name}_ratio"] = _median(ratios)
        r = row["fetch_ratios"]
        if len(r) < 2:
            row["verdict"] = "one run: no spread (use --repeat 3)"
        elif max(r) < 1:
            row["verdict"] = f"objectcache faster in {len(r)} of {len(r)} runs"
        elif min(r) > 1:
            row["verdict"] = f"objectcache slower in {len(r)} of {len(r)} runs"
        else:
            row["verdict"] = f"within noise ({sum(x < 1 for x in r)} of {len(r)} runs faster)"
        out.append(row)
    return out


def _ratio(row: dict, name: str) -> str:
    rs = row.get(f"{name}_ratios")
    if not rs:
        return "n/a"
    return f"{row[f'{name}_ratio']:.2f} ({min(rs):.2f}-{max(rs):.2f})"


def summary(rows: list[dict]) -> str:
    """One line per peer: at how many points objectcache was faster, slower, or within noise."""
    out = []
    for peer in dict.fromkeys(r["peer"] for r in rows):
        mine = [r for r in rows if r["peer"] == peer]
        n = {k: sum(r["verdict"].startswith(w) for r in mine)
             for k, w in (("faster", "objectcache faster"), ("slower", "objectcache slower"), ("noise", "within"))}
        rest = len(mine) - sum(n.values())
        ratios = [r["fetch_ratio"] for r in mine if r.get("fetch_ratio")]
        span = f"; fetch ratio {min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""
        out.append(f"objectcache vs {peer}: faster at {n['faster']}, slower at {n['slower']}, within noise at "
                   f"{n['noise']}" + (f", not compared at {rest}" if rest else "") + f" of {len(mine)} points{span}")
    return "\n".join(out)


def table(rows: list[dict]) -> str:
    lines = ["| objectcache vs | prefix | conc | runs | storage-hit reqs (oc / peer) | fetch ratio median (min-max) "
             "| TTFT ratio median (min-max) | verdict |", "|" + "|".join("---" for _ in range(8)) + "|"]
    for r in rows:
        oc, peer = r["storage_hit_requests"]
        lines.append(f"| {r['peer']} | {r['system_prompt_len']} | {r['concurrency']} | {r['runs']} | {oc} / {peer} "
                     f"| {_ratio(r, 'fetch')} | {_ratio(r, 'ttft')} | {r['verdict']} |")
    return "\n".join(lines)


MEANINGS = """\
Columns of the first table (each number: the median over the runs of that backend at that point):
  hit device / host / storage   share of all prompt tokens found on the device, in host memory, in storage
  storage-hit reqs              requests that loaded a prefix from storage (the same requests for every backend)
  fetch ms mean / p90           storage -> host pool time of those requests, measured here
  first batch ms                until the first batch of pages was in host memory, measured
  first layer ms                until layer 0 of the whole hit was in host memory (objectcache: it streams layer
                                by layer; n/a: the backend returns whole batches)
  fetch GiB/s                   bytes from storage / fetch time
  TTFT ms (modelled)            fetch (measured) + host->GPU copy and prefill of the uncached tokens (modelled,
                                H200 per-layer fit, docs/benchmarks.md), over all requests
  GiB read / written            KV bytes moved by the backend
  verified GiB (from storage)   reused KV compared with what was written, all equal (of it, from storage)
  S3 requests                   HTTP requests the backend sent (n/a: not S3)
  objectcache-linker            SGLang 0.5.23's linker route, one run per point: no host tier (its host hits are
                                storage hits, so it is not in the verdict); fetch: storage -> the request's device slots, until the
                                last layer; TTFT: layer l computes (modelled) once layer l is in and layer l-1 done
The verdict table: ratio = objectcache / peer (below 1: objectcache is faster), one sample per run,
each run with every backend back to back; "within noise" unless every run agrees."""
