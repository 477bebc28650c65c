"""Shared-prefix workload benchmark: both modes.

    python benchmarks/shared_prefix.py replay                      # CPU: SGLang 0.5.23's HiCache + SeaweedFS
    python benchmarks/shared_prefix.py replay --system-prompt-len 512,2048 --concurrency 1,4
    python benchmarks/shared_prefix.py live --url http://127.0.0.1:30000 --concurrency 1,8

`live` is the package's `objectcache bench shared-prefix live` (sglang_objectcache/cli/bench.py).
`replay` runs SGLang's HiCache tree and cache controller on CPU with synthetic KV (benchmarks/replay.py,
with the CPU shims and the local SeaweedFS of tests/testbed); `make bench` runs it. `-h` after the
mode lists the options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # testbed: local S3 servers, CPU shims

from sglang_objectcache.bench import report  # noqa: E402
from sglang_objectcache.bench.workload import describe, generate  # noqa: E402
from sglang_objectcache.cli.bench import _meta, _spec_args, _specs, add_modes  # noqa: E402


def add_replay(modes) -> None:
    rp = modes.add_parser("replay", help="SGLang's HiCache tree + controller on CPU with synthetic KV")
    _spec_args(rp)
    rp.add_argument("--backends", default="objectcache,objectcache-linker,file,seaweedfs",
                    help="comma list; objectcache-obstore = objectcache with native_reads: off; "
                    "objectcache-linker = the 0.5.23 linker route (no host tier; not in the verdict)")
    rp.add_argument("--endpoint", help="an S3 server to use instead of starting SeaweedFS (credentials from "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, bucket from --bucket)")
    rp.add_argument("--bucket", default="kv-cache")
    rp.add_argument("--layers", type=int, default=32)
    rp.add_argument("--heads", type=int, default=8, help="KV heads")
    rp.add_argument("--head-dim", type=int, default=128)
    rp.add_argument("--page-size", type=int, default=64)
    rp.add_argument("--host-frac", type=float, default=0.5,
                    help="host pool as a fraction of the distinct prefixes (small: prefixes spill to storage)")
    rp.add_argument("--prefetch-threshold", type=int, default=256)
    rp.add_argument("--repeat", type=int, default=3,
                    help="runs per point, every backend in each, in rotating order; the verdict needs them all to agree")
    rp.add_argument("--race-writes", action="store_true",
                    help="let storage writes race the next requests, as on a server (then backends may see "
                    "different storage hits and are not compared); default: each wave's writes land first")
    rp.set_defaults(fn=run_replay, system_prompt_len="512,1024", concurrency="1,2")


def run_replay(args) -> int:
    import replay
    import replay_linker
    import verdict
    from testbed import servers

    replay.setup_sglang()
    logging.getLogger().setLevel(logging.WARNING)
    names, skipped = replay.available_backends([b.strip() for b in args.backends.split(",") if b.strip()])
    for s in skipped:
        print(f"skipping {s}", file=sys.stderr)
    geo = replay.Geometry(args.layers, args.heads, args.head_dim, args.page_size)

    owned = False
    if any(n in ("objectcache", "objectcache-linker", "seaweedfs") for n in names):
        if args.endpoint:
            srv = servers.S3Server(kind="external", endpoint=args.endpoint,
                                   access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
                                   secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""), bucket=args.bucket)
        else:
            print("starting SeaweedFS on 127.0.0.1 (temporary directory, removed at the end) ...", file=sys.stderr)
            srv = servers.start_seaweedfs()
            owned = True
        os.environ.update(srv.env())
    else:
        srv = None
    specs = list(_specs(args))
    runs_per_point = sum(1 if n == "objectcache-linker" else args.repeat for n in names)
    total = sum(len(generate(s)) for s in specs) * runs_per_point
    bar = report.Progress(total, "replay")
    rows, raw, verdicts = [], [], []
    try:
        for spec in specs:
            reqs = generate(spec)
            dev, host = replay.sizes_for(reqs, spec.concurrency, geo.page_size, args.host_frac)
            point = (spec.system_prompt_len, spec.concurrency)
            runs: dict[str, list] = {n: [] for n in names}
            for rep in range(args.repeat):
                for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: no backend always first
                    step = (lambda b, spl=spec.system_prompt_len, c=spec.concurrency,
                            k=rep: bar.step(f"{b} prefix={spl} c={c} run {k + 1}/{args.repeat}"))
                    if name == replay_linker.NAME:  # the same device pool, no host tier
                        if rep:  # not in the verdict, so one run per point
                            continue
                        run = replay_linker.run_linker(reqs, srv=srv, geo=geo, concurrency=spec.concurrency,
                                                       device_tokens=dev, progress=step)
                    else:
                        run = replay.run_backend(name, reqs, srv=srv, geo=geo, concurrency=spec.concurrency,
                                                 device_tokens=dev, host_tokens=host,
                                                 prefetch_threshold=args.prefetch_threshold,
                                                 settle_writes=not args.race_writes, progress=step)
                    row = replay.summarize(run)
                    runs[name].append((row, tuple(q.storage_hit for q in run.requests)))
                    raw.append({"spec": spec.__dict__, "shape": describe(reqs), "device_tokens": dev,
                                "host_tokens": host, "run_index": rep, "summary": row, "run": run.to_dict()})
            rows.extend(verdict.median_row([r for r, _ in runs[n]]) for n in names)
            verdicts.extend(verdict.compare(point, {n: r for n, r in runs.items() if n != replay_linker.NAME}))
    finally:
        if owned:
            srv.stop()
    print()
    print(f"replay: SGLang {_sglang_version()} HiCache (UnifiedRadixCache + HybridCacheController) on CPU, "
          f"synthetic KV {geo.layers} layers x {geo.heads} heads x {geo.head_dim} dim bf16, page {geo.page_size} "
          f"({geo.bytes_per_token * geo.page_size / 2**20:g} MiB/page); {os.cpu_count()} cores")
    print(replay.table(rows))
    print()
    print(verdict.table(verdicts))
    print()
    print(verdict.MEANINGS)
    print()
    print(verdict.summary(verdicts))
    if args.race_writes:
        print("--race-writes: storage writes raced the requests; backends whose storage hits differ are not compared")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "replay.json")
    report.write_json(path, {"meta": {**_meta(), "sglang": _sglang_version(), "geometry": geo.__dict__,
                                      "repeat": args.repeat, "settle_writes": not args.race_writes,
                                      "server": getattr(srv, "kind", None),
                                      "modelled": {"prefill_ms_per_layer": "c + a*n + b*n*ctx",
                                                   "coefficients": replay.PREFILL_MS,
                                                   "h2d_bytes_per_s": replay.H2D_BYTES_PER_S}},
                                "runs": raw, "verdicts": verdicts})
    pngs = report.plots(rows, args.out,
                        [("fetch_ms_mean", "storage fetch, mean (ms)"),
                         ("ttft_modelled_ms_mean", "TTFT mean (ms, modelled)")],
                        [("system_prompt_len", "shared prefix (tokens)"), ("concurrency", "concurrency")], "replay")
    print(f"\nresults: {path}" + "".join(f"\nplot: {p}" for p in pngs))
    bad = [r for r in raw if r["summary"]["corrupt_tokens"]]
    return 1 if bad else 0


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:  # noqa: BLE001
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/shared_prefix.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replay(add_modes(ap))
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
