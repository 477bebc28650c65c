"""`objectcache bench shared-prefix live`: the shared-prefix workload against a running SGLang server.

    objectcache bench shared-prefix live --url http://127.0.0.1:30000 --concurrency 1,4,16

The replay mode (SGLang's HiCache on CPU, synthetic KV) is in the repository, not in this package:
`benchmarks/shared_prefix.py replay`, which reuses the workload options, specs and metadata here.
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
    bench = sub.add_parser("bench", help="benchmarks: shared-prefix (against a running SGLang server)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    sp = bsub.add_parser("shared-prefix", help="shared-prefix workload; mode: live",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_modes(sp)


def add_modes(parser: argparse.ArgumentParser):
    """The mode subcommands (`live`) on `parser`; returns its subparsers, to which
    benchmarks/shared_prefix.py adds `replay`."""
    modes = parser.add_subparsers(dest="mode", required=True)
    live = modes.add_parser("live", help="stream the workload to a running SGLang server")
    _spec_args(live)
    live.add_argument("--url", default="http://127.0.0.1:30000")
    live.add_argument("--label", default="", help="name of this run in the table (e.g. the backend)")
    live.add_argument("--warmup", type=int, default=1, help="requests sent first and not counted")
    live.set_defaults(fn=run_live)
    return modes


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
    print(report.live_table(rows))
    print("\nTTFT by where the prefix came from:\n" + report.source_table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "live.json")
    report.write_json(path, {"meta": {**_meta(), "url": args.url}, "runs": raw})
    pngs = report.plots(rows, args.out, [("ttft_mean_ms", "TTFT mean (ms)"), ("ttft_p90_ms", "TTFT p90 (ms)")],
                        [("system_prompt_len", "shared prefix (tokens)"), ("concurrency", "concurrency")], "live")
    print(f"\nresults: {path}" + "".join(f"\nplot: {p}" for p in pngs))
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1


def main(argv=None) -> int:
    """`python -m sglang_objectcache.cli.bench live ...` = `objectcache bench shared-prefix live ...`."""
    ap = argparse.ArgumentParser(prog="objectcache")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(["bench", "shared-prefix", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
