"""`objectcache bench shared-prefix`: the shared-prefix benchmark (live or replay).

    objectcache bench shared-prefix replay                     # CPU, SGLang 0.5.23, starts SeaweedFS
    objectcache bench shared-prefix live --url http://127.0.0.1:30000 --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def _spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (SGLang's generated-shared-prefix parameters)")
    g.add_argument("--num-groups", type=int, default=8)
    g.add_argument("--prompts-per-group", type=int, default=3)
    g.add_argument("--system-prompt-len", default="1024", help="tokens; a comma list sweeps it, e.g. 512,2048")
    g.add_argument("--question-len", type=int, default=64)
    g.add_argument("--output-len", type=int, default=16)
    g.add_argument("--group-distribution", choices=("uniform", "zipf"), default="uniform")
    g.add_argument("--zipf-alpha", type=float, default=None)
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (live mode)")
    g.add_argument("--concurrency", default="1", help="requests in flight; a comma list sweeps it")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--out", default="results/shared-prefix", help="directory for JSON and PNG results")


def add_parser(sub) -> None:
    """Register `bench` with its `shared-prefix` subcommand on the CLI's subparsers."""
    bench = sub.add_parser("bench", help="benchmarks: shared-prefix (live against SGLang, or replay on CPU)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    sp = bsub.add_parser("shared-prefix", help="shared-prefix workload; modes: live, replay",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = sp.add_subparsers(dest="mode", required=True)
    live = modes.add_parser("live", help="stream the workload to a running SGLang server")
    _spec_args(live)
    live.add_argument("--url", default="http://127.0.0.1:30000")
    live.add_argument("--label", default="", help="name of this run in the table (e.g. the backend)")
    live.add_argument("--warmup", type=int, default=1, help="requests sent first and not counted")
    live.set_defaults(fn=run_live)
    rp = modes.add_parser("replay", help="SGLang's HiCache tree + controller on CPU with synthetic KV")
    _spec_args(rp)
    rp.add_argument("--backends", default="objectcache,file,seaweedfs",
                    help="comma list; objectcache-obstore = objectcache with native_reads: off")
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
    rp.set_defaults(fn=run_replay)


def _specs(args):
    from ..bench.workload import WorkloadSpec

    for spl in _ints(args.system_prompt_len):
        for conc in _ints(args.concurrency):
            yield WorkloadSpec(num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
                               system_prompt_len=spl, question_len=args.question_len, output_len=args.output_len,
                               group_distribution=args.group_distribution, zipf_alpha=args.zipf_alpha,
                               request_rate=args.request_rate, concurrency=conc, seed=args.seed)


def _meta() -> dict:
    return {"machine": f"{platform.node()} {os.cpu_count()} cores", "python": sys.version.split()[0],
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_live(args) -> int:
    from ..bench import live, report
    from ..bench.workload import describe, generate

    rows, raw = [], []
    specs = list(_specs(args))
    for spec in specs:
        reqs = generate(spec)
        if args.warmup:
            warm = generate(spec.__class__(**{**spec.__dict__, "seed": spec.seed + 10_000, "num_groups": 1,
                                              "prompts_per_group": args.warmup}))
            live.run(args.url, warm, concurrency=1, request_rate_paced=False)
        bar = report.Progress(len(reqs), f"live c={spec.concurrency} prefix={spec.system_prompt_len}")
        results, wall = live.run(args.url, reqs, concurrency=spec.concurrency,
                                 progress=lambda d, n: bar.step())
        s = live.summarize(results, wall)
        s.update(label=args.label or s["storage_backend"] or "server", concurrency=spec.concurrency,
                 system_prompt_len=spec.system_prompt_len)
        rows.append(s)
        raw.append({"spec": spec.__dict__, "shape": describe(reqs), "summary": s,
                    "requests": live.results_json(results)})
    print()
    print(live_table := report.live_table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "live.json")
    report.write_json(path, {"meta": {**_meta(), "url": args.url}, "runs": raw})
    pngs = report.plots(rows, args.out, [("ttft_mean_ms", "TTFT mean (ms)"), ("ttft_p90_ms", "TTFT p90 (ms)")],
                        [("system_prompt_len", "shared prefix (tokens)"), ("concurrency", "concurrency")], "live")
    print(f"\nresults: {path}" + "".join(f"\nplot: {p}" for p in pngs))
    del live_table
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1


def run_replay(args) -> int:
    from ..bench import replay, report
    from ..bench.workload import describe, generate

    replay.setup_sglang()
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    names, skipped = replay.available_backends([b.strip() for b in args.backends.split(",") if b.strip()])
    for s in skipped:
        print(f"skipping {s}", file=sys.stderr)
    geo = replay.Geometry(args.layers, args.heads, args.head_dim, args.page_size)
    from ..testbed import servers

    owned = False
    if any(n in ("objectcache", "seaweedfs") for n in names):
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
    total = sum(len(generate(s)) for s in specs) * len(names)
    bar = report.Progress(total, "replay")
    rows, raw = [], []
    try:
        for spec in specs:
            reqs = generate(spec)
            dev, host = replay.sizes_for(reqs, spec.concurrency, geo.page_size, args.host_frac)
            for name in names:
                run = replay.run_backend(name, reqs, srv=srv, geo=geo, concurrency=spec.concurrency,
                                         device_tokens=dev, host_tokens=host,
                                         prefetch_threshold=args.prefetch_threshold,
                                         progress=lambda b, spl=spec.system_prompt_len, c=spec.concurrency:
                                         bar.step(f"{b} prefix={spl} c={c}"))
                row = replay.summarize(run)
                rows.append(row)
                raw.append({"spec": spec.__dict__, "shape": describe(reqs), "device_tokens": dev,
                            "host_tokens": host, "summary": row, "run": run.to_dict()})
    finally:
        if owned:
            srv.stop()
    print()
    print(f"replay: SGLang {_sglang_version()} HiCache (UnifiedRadixCache + HybridCacheController) on CPU, "
          f"synthetic KV {geo.layers} layers x {geo.heads} heads x {geo.head_dim} dim bf16, page {geo.page_size} "
          f"({geo.bytes_per_token * geo.page_size / 2**20:g} MiB/page); {os.cpu_count()} cores")
    print(report.replay_table(rows))
    print("\nfetch, first batch, first layer: measured here (storage -> host pool). TTFT (modelled) = measured fetch"
          " + modelled host->GPU copy (55 GB/s) + modelled prefill of the uncached tokens (H200 per-layer fit,"
          " docs/benchmarks.md). first layer: objectcache's per-layer readiness; n/a = the backend cannot tell"
          " (whole 128-page batches).")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "replay.json")
    report.write_json(path, {"meta": {**_meta(), "sglang": _sglang_version(), "geometry": geo.__dict__,
                                      "server": getattr(srv, "kind", None),
                                      "modelled": {"prefill_ms_per_layer": "c + a*n + b*n*ctx",
                                                   "coefficients": replay.PREFILL_MS,
                                                   "h2d_bytes_per_s": replay.H2D_BYTES_PER_S}},
                                "runs": raw})
    pngs = report.plots(rows, args.out,
                        [("fetch_ms_mean", "storage fetch, mean (ms)"),
                         ("ttft_modelled_ms_mean", "TTFT mean (ms, modelled)")],
                        [("system_prompt_len", "shared prefix (tokens)"), ("concurrency", "concurrency")], "replay")
    print(f"\nresults: {path}" + "".join(f"\nplot: {p}" for p in pngs))
    bad = [r for r in rows if r["corrupt_tokens"]]
    return 1 if bad else 0


def _sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:  # noqa: BLE001
        return "?"


def main(argv=None) -> int:
    """`python -m sglang_objectcache.cli.bench live|replay ...` = `objectcache bench shared-prefix ...`."""
    ap = argparse.ArgumentParser(prog="objectcache")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["bench", "shared-prefix", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
