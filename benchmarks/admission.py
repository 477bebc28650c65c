"""How long SGLang 0.5.17 takes to admit requests whose prefix is in no tier, with our backend attached.

Under `--hicache-storage-prefetch-policy wait_complete` a request long enough to query storage is
held until SGLang's prefetch thread has asked the backend (`batch_exists`) and revoked the
prefetch. That thread needs the GIL to do it, and the scheduler thread, which spins in Python,
holds it: each hand-over can wait a whole switch interval (Python's 5 ms). Here the real tree and
controller (0.5.17 with the patch set, on CPU) run beside a loop that stands in for the scheduler:
it spins in Python and, each turn, does what the scheduler does (`check_hicache_events`, then
`check_prefetch_progress` for each waiting request). Requests come one at a time (c1) or eight at
once (c8); printed: admission latency (queued to admitted) per mode, in one run, alternating.

    .venv/sglang-0.5.17/bin/python benchmarks/admission.py          # starts its own SeaweedFS
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from testbed import cpu_shims  # noqa: E402

cpu_shims.install()

PAGE = 16


def spin(seconds: float) -> None:
    """The scheduler's own Python between its checks, holding the GIL throughout: an idle
    scheduler's turn takes microseconds, a busy one's several milliseconds (a forward launches its
    kernels from Python)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def admit_all(tree, rids: dict, window: float, turn: float) -> dict:
    """Queue each request's prefetch as the scheduler does, then spin until every one is admitted;
    seconds from queueing to admission, per request."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    lw = tree.cache_controller.oc_layerwise
    lw.query_interval = window  # 0: the other arm, as before the window
    queued, admitted = {}, {}
    for rid, tokens in rids.items():
        m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        queued[rid] = time.perf_counter()
        tree.prefetch_from_storage(rid, m.last_host_node, tokens)
    deadline = time.monotonic() + 30
    while len(admitted) < len(rids):
        if time.monotonic() > deadline:
            raise RuntimeError("requests not admitted in 30 s")
        tree.check_hicache_events()
        for rid in rids:
            if rid not in admitted and tree.check_prefetch_progress(rid):
                admitted[rid] = time.perf_counter() - queued[rid]
        spin(turn)
    return admitted


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="per mode and shape")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--turns", default="0.05,5", help="ms of Python per scheduler turn: idle, busy")
    ap.add_argument("--window-ms", type=float, default=1.0, help="the window's switch interval (QUERY_INTERVAL: 1 ms)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "admission.json"))
    args = ap.parse_args(argv)
    from testbed.hiradix import build_tree
    from testbed.servers import start_seaweedfs

    srv = start_seaweedfs()
    os.environ.update(srv.env())
    extra = {"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket,
                        "prefix": f"adm-{uuid.uuid4().hex[:8]}"}], "prefetch_threshold": 64}
    tree = build_tree(extra, layers=8, page_size=PAGE, device_tokens=8192)
    turns = [float(x) for x in args.turns.split(",")]
    res: dict = {"interval_s": sys.getswitchinterval(), "rounds": args.rounds, "tokens": args.tokens, "turns_ms": turns}
    try:
        n = 0
        samples: dict = {}
        for _ in range(args.rounds):
            for window in (0.0, args.window_ms / 1e3):  # alternating: drift between the arms stays out of the ratio
                for turn, (shape, width) in ((t, sw) for t in turns for sw in (("c1", 1), ("c8", 8))):
                    rids = {}
                    for _ in range(width):
                        n += 1
                        rids[f"r{n}"] = [(n * 7919 + i) % 30000 + 3 for i in range(args.tokens)]
                    got = admit_all(tree, rids, window, turn / 1e3)
                    key = f"{shape}-turn{turn:g}ms-{'window' if window else 'python'}"
                    samples.setdefault(key, []).extend(got.values())
                    tree.reset()
        for key, xs in sorted(samples.items()):
            xs = sorted(xs)
            res[key] = {"median_ms": round(statistics.median(xs) * 1e3, 2),
                        "p90_ms": round(xs[int(len(xs) * 0.9)] * 1e3, 2), "n": len(xs)}
            print(f"{key:24s} admitted after {res[key]['median_ms']:7.2f} ms median, {res[key]['p90_ms']:7.2f} p90 "
                  f"({len(xs)} requests)", flush=True)
        for shape in ("c1", "c8"):
            for turn in turns:
                a, b = res[f"{shape}-turn{turn:g}ms-python"], res[f"{shape}-turn{turn:g}ms-window"]
                print(f"{shape}, {turn:g} ms turns: window / Python's interval: median "
                      f"x{b['median_ms'] / a['median_ms']:.2f}, p90 x{b['p90_ms'] / a['p90_ms']:.2f}", flush=True)
    finally:
        tree.cache_controller.storage_backend.close()
        srv.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
