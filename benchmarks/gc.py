"""Garbage collection under load: a writer writes 3x the byte budget while a reader keeps reading a
hot set of prefixes; with the collector on, the bucket must stay within the budget (+5% after each
pass), the hot set must stay in S3, and the reads must keep their rate. Printed as ratios measured
side by side in one run: the same load without a budget, then with one.

    python benchmarks/gc.py                      # starts its own SeaweedFS
    python benchmarks/gc.py --objects 48 --out results/gc.json

Time constants are scaled down ~15x so that a run takes a minute, not an hour: the collector runs
every 2 s (default 60 s), objects younger than 4 s are spared (60 s), readers publish their reads
every 2 s (30 s). Objects are 16 layers x 8 pages x 32 KiB pieces (4 MiB), written one every
`--pace` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402

from sglang_objectcache.config import parse_config  # noqa: E402
from sglang_objectcache.engine.cache import ObjectCache  # noqa: E402
from sglang_objectcache.format import SegmentTable  # noqa: E402
from sglang_objectcache.keys import Fingerprint  # noqa: E402

LAYERS, PAGES, PIECE = 16, 8, 32 << 10
GC_INTERVAL, GRACE, USE_EVERY = 2.0, 4.0, 2.0


def fingerprint() -> Fingerprint:
    return Fingerprint(model="bench-gc", dtype="bfloat16", page_size=16, n_layers=LAYERS, start_layer=0,
                       piece_bytes=PIECE, attention="mha", kv_heads=8, head_dim=128, v_head_dim=128, tp_rank=0,
                       tp_size=1)


def span(i: int) -> tuple[list[str], np.ndarray]:
    import hashlib

    ks, h = [], f"span{i}".encode()
    for p in range(PAGES):
        h = hashlib.sha256(h + bytes([p])).digest()
        ks.append(h.hex())
    data = np.random.default_rng(i).integers(0, 256, size=(PAGES, LAYERS, PIECE), dtype=np.uint8)
    return ks, data


def segments(data: np.ndarray) -> SegmentTable:
    base = np.array([[data[p, layer].ctypes.data for p in range(PAGES)] for layer in range(LAYERS)], dtype=np.int64)
    return SegmentTable(np.stack([base[..., None], np.full_like(base, PIECE)[..., None]], axis=-1))


def bucket_bytes(srv, prefix: str) -> int:
    import boto3

    s3 = boto3.client("s3", **srv.client_kwargs())
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=srv.bucket, Prefix=prefix + "/"):
        total += sum(o["Size"] for o in page.get("Contents", []) if o["Key"].split("/")[-2] == "d")
    return total


def phase(srv, capacity: int | None, n_objects: int, hot: int, pace: float) -> dict:
    prefix = f"bench-gc-{uuid.uuid4().hex[:8]}"
    tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix,
            "index_refresh_interval": "500ms", "manifest_flush_interval": "200ms"}
    if capacity:
        tier.update(capacity=capacity, gc_interval=GC_INTERVAL)
    writer = ObjectCache(parse_config({"tiers": [tier], "timeout": 30}), fingerprint())
    reader = ObjectCache(parse_config({"tiers": [{**tier, "capacity": None}], "timeout": 30}), fingerprint())
    writer.tiers[0].collector.grace = GRACE
    reader.tiers[0].journal.use_every = USE_EVERY
    spans = [span(i) for i in range(n_objects)]
    stop = threading.Event()
    reads: list[tuple[float, int]] = []  # (seconds, bytes) of each hot-set read
    misses = [0]
    try:
        for ks, data in spans[:hot]:
            assert all(writer.put(ks, segments(data)))
        writer.flush()
        while reader.exists(spans[hot - 1][0]) < PAGES:
            time.sleep(0.1)

        def read_loop():
            dst = np.empty((PAGES, LAYERS, PIECE), np.uint8)
            i = 0
            while not stop.is_set():
                ks, data = spans[i % hot]
                t0 = time.perf_counter()
                ok = reader.get(ks, segments(dst))
                dt = time.perf_counter() - t0
                if all(ok):
                    reads.append((dt, PAGES * LAYERS * PIECE))
                else:
                    misses[0] += 1
                i += 1
        samples = []  # bucket bytes, sampled every GC interval

        def sample_loop():
            while not stop.wait(GC_INTERVAL):
                samples.append(bucket_bytes(srv, prefix))
        threads = [threading.Thread(target=read_loop), threading.Thread(target=sample_loop)]
        for t in threads:
            t.start()
        t_start = time.monotonic()
        for ks, data in spans[hot:]:
            assert all(writer.put(ks, segments(data)))
            time.sleep(pace)
        time.sleep(2 * GC_INTERVAL + GRACE)  # the last writes age past the grace and a pass runs
        stop.set()
        for t in threads:
            t.join()
        writer.flush()
        hot_in_s3 = 0
        fresh = ObjectCache(parse_config({"tiers": [{**tier, "capacity": None}], "timeout": 30}), fingerprint())
        try:
            dst = np.empty((PAGES, LAYERS, PIECE), np.uint8)
            for ks, data in spans[:hot]:
                hot_in_s3 += all(fresh.get(ks, segments(dst))) and np.array_equal(dst, data)
        finally:
            fresh.close()
        seconds = time.monotonic() - t_start
        rate = sum(b for _, b in reads) / max(1e-9, sum(t for t, _ in reads))
        stats = writer.snapshot()["tiers"][writer.tiers[0].name]
        return {"capacity": capacity, "written_bytes": n_objects * (bucket_bytes_per := PAGES * LAYERS * PIECE),
                "object_bytes": bucket_bytes_per, "seconds": seconds, "reads": len(reads), "read_misses": misses[0],
                "read_gib_s": rate / 2**30, "read_ms_median": statistics.median(t for t, _ in reads) * 1e3 if reads else None,
                "bucket_samples": samples, "final_bytes": bucket_bytes(srv, prefix), "hot_in_s3": hot_in_s3,
                "hot": hot, "gc": {k: v for k, v in stats.items() if k.startswith("gc_")}}
    finally:
        stop.set()
        reader.close()
        writer.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=48, help="the budget, in objects (the load writes 3x)")
    ap.add_argument("--hot", type=int, default=6, help="objects in the hot set")
    ap.add_argument("--pace", type=float, default=0.2, help="seconds between object writes")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "gc.json"))
    args = ap.parse_args(argv)
    from testbed import servers

    print("starting SeaweedFS (a temporary directory, removed at the end) ...", flush=True)
    srv = servers.start_seaweedfs(memory_limit_mb=None)
    os.environ.update(srv.env())
    try:
        obj = PAGES * LAYERS * PIECE
        budget = args.objects * obj
        n = 3 * args.objects
        print(f"budget {budget / 2**20:.0f} MiB ({args.objects} objects); writing {n} objects", flush=True)
        base = phase(srv, None, n, args.hot, args.pace)
        print(f"without a budget: {base['final_bytes'] / 2**20:.0f} MiB stored, reads {base['read_gib_s']:.2f} GiB/s",
              flush=True)
        gc = phase(srv, budget, n, args.hot, args.pace)
    finally:
        srv.stop()
    worst = max(gc["bucket_samples"][len(gc["bucket_samples"]) // 3:] or [gc["final_bytes"]])
    ratios = {"final_over_budget": gc["final_bytes"] / budget,
              "worst_sample_over_budget (after the first third)": worst / budget,
              "hot_prefixes_in_s3": f"{gc['hot_in_s3']}/{gc['hot']}",
              "read_rate_with_gc_over_without": gc["read_gib_s"] / base["read_gib_s"]}
    print("\n| measure | value |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(f"| bucket bytes / budget, every {GC_INTERVAL:g} s | "
          + " ".join(f"{s / budget:.2f}" for s in gc["bucket_samples"]) + " |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": {"machine": f"{platform.node()} {os.cpu_count()} cores",
                            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "budget": budget,
                            "scaled": {"gc_interval": GC_INTERVAL, "grace": GRACE, "use_every": USE_EVERY}},
                   "without": base, "with": gc, "ratios": ratios}, f, indent=1)
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
