"""Index benchmark: how long a new instance takes to start, and what its index holds in memory,
against a namespace with a long history of manifests.

    python benchmarks/index.py                               # starts its own SeaweedFS
    python benchmarks/index.py --pages 10000,100000 --out results/index.json

For each size, the history is written as a long-running server writes it: manifests of a few
8-page objects each (`--objects-per-manifest`), named half a second apart, with Llama-3.1-8B's
geometry (32 layers, 256 KiB pieces). Only the manifests are written: starting an instance reads
the journal, not the data. Meanwhile a long-running instance (`ObjectCache`) follows the journal
in steps of 2,000 manifests and checkpoints it as it would live (every CHECKPOINT_AFTER manifests;
the deletion of covered manifests runs without its delay, which only matters to instances
starting at that moment). `--no-checkpoints` leaves the history whole instead, as a namespace
written by the previous release looks.

Then a new instance is started (`ObjectCache`, the same code SGLang runs) and timed, and the
memory its index holds is measured with tracemalloc in a second start. A start that exceeds the
startup limit is reported as failed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import time
import tracemalloc
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # testbed: local S3 servers

import msgpack  # noqa: E402

from sglang_objectcache.config import parse_config  # noqa: E402
from sglang_objectcache.engine.cache import ObjectCache  # noqa: E402
from sglang_objectcache.engine.index import pack_hashes  # noqa: E402
from sglang_objectcache.errors import StartupError  # noqa: E402
from sglang_objectcache.keys import Fingerprint, Namespace  # noqa: E402

LAYERS, PIECE, PAGES_PER_OBJECT = 32, 256 << 10, 8


def fingerprint() -> Fingerprint:
    return Fingerprint(model="bench-index", dtype="bfloat16", page_size=64, n_layers=LAYERS, start_layer=0,
                       piece_bytes=PIECE, attention="mha", kv_heads=8, head_dim=128, v_head_dim=128, tp_rank=0,
                       tp_size=1)


def history(root: str, n_pages: int, per_manifest: int, seed: int) -> list[tuple[str, bytes]]:
    """(name, body) of the manifests announcing `n_pages` pages, half a second apart."""
    import random

    rng = random.Random(seed)
    writer, t0 = uuid.uuid4().hex[:8], int(time.time() * 1000) - n_pages * 100
    meta = 3000
    out, objects = [], []
    for i in range(n_pages // PAGES_PER_OBJECT):
        keys = [rng.randbytes(32).hex() for _ in range(PAGES_PER_OBJECT)]
        objects.append([f"d/{keys[0]}-{PAGES_PER_OBJECT}", LAYERS, PIECE, meta, pack_hashes(keys),
                        rng.getrandbits(64)])
        if len(objects) == per_manifest:
            seq = len(out) + 1
            name = f"{root}m/{t0 + 500 * seq:013d}-{writer}-{seq:06d}"
            out.append((name, msgpack.packb({"v": 2, "objects": objects}, use_bin_type=True)))
            objects = []
    return out


async def put_all(srv, items: list[tuple[str, bytes]], concurrency: int = 64) -> None:
    from sglang_objectcache.stores.credentials import Credentials
    from sglang_objectcache.stores.s3_obstore import ObstoreS3Store

    store = ObstoreS3Store(bucket=srv.bucket, endpoint=srv.endpoint, region="us-east-1",
                           creds=Credentials(srv.access_key, srv.secret_key, None), max_connections=concurrency,
                           request_timeout=30, connect_timeout=5, max_retries=3)
    sem = asyncio.Semaphore(concurrency)

    async def one(name, body):
        async with sem:
            await store.put(name, body, create_only=False)
    await asyncio.gather(*(one(n, b) for n, b in items))


def config(srv, prefix: str):
    return parse_config({"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix,
                                    "index_refresh_interval": "60m"}]})


def written_with_checkpoints(srv, prefix: str, items, step: int = 2000) -> dict:
    """Write the history while a long-running instance follows and checkpoints it."""
    server = ObjectCache(config(srv, prefix), fingerprint())
    j = server.tiers[0].journal
    j.delete_delay, j._jitter = 0.0, 1.0
    try:
        for i in range(0, len(items), step):
            asyncio.run(put_all(srv, items[i:i + step]))
            server.runtime.run(j.refresh(), timeout=600)
            if j._since >= j.checkpoint_after and server.runtime.run(j.checkpoint(), timeout=600):
                server.runtime.run(asyncio.wait_for(asyncio.shield(j.deleting), 600), timeout=600)
        return {"checkpoint_epoch": j._epoch}
    finally:
        server.close()


def stored(srv, prefix: str) -> dict:
    """What the namespace holds of the journal: manifests and checkpoint bytes."""
    import boto3

    s3 = boto3.client("s3", **srv.client_kwargs())
    out = {"left_manifests": 0, "checkpoint_bytes": 0}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=srv.bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            part = o["Key"].split("/")[-2]
            if part == "m":
                out["left_manifests"] += 1
            elif part == "k":
                out["checkpoint_bytes"] += o["Size"]
    return out


def start(srv, prefix: str, traced: bool) -> dict:
    cfg = config(srv, prefix)
    gc.collect()
    if traced:
        tracemalloc.start()
    try:
        t0 = time.perf_counter()
        try:
            c = ObjectCache(cfg, fingerprint())
        except StartupError as e:
            return {"failed": str(e)[:200], "seconds": time.perf_counter() - t0}
        out = {"seconds": time.perf_counter() - t0, "objects": c.tiers[0].index.n_objects,
               "pages": c.tiers[0].index.n_pages, "requests": dict(c.tiers[0].requests)}
        if traced:
            gc.collect()
            out["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        c.close()
        return out
    finally:
        if traced:  # after a failed start too: the next size is timed untraced
            tracemalloc.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", default="10000,100000,1000000", help="history sizes, in pages")
    ap.add_argument("--objects-per-manifest", type=int, default=2)
    ap.add_argument("--no-checkpoints", action="store_true", help="leave the history whole (no instance follows it)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "index.json"))
    args = ap.parse_args(argv)
    from testbed import servers

    print("starting SeaweedFS (a temporary directory, removed at the end) ...", flush=True)
    srv = servers.start_seaweedfs(memory_limit_mb=None)
    os.environ.update(srv.env())
    rows = []
    try:
        for n in (int(x) for x in args.pages.split(",")):
            prefix = f"bench-{uuid.uuid4().hex[:8]}"
            root = Namespace(prefix, fingerprint().model, fingerprint().digest).root
            items = history(root, n, args.objects_per_manifest, seed=n)
            t0 = time.perf_counter()
            extra = {}
            if args.no_checkpoints:
                asyncio.run(put_all(srv, items))
            else:
                extra = written_with_checkpoints(srv, prefix, items)
            left = stored(srv, prefix)
            print(f"{n} pages: {len(items)} manifests written in {time.perf_counter() - t0:.1f} s; the namespace "
                  f"holds {left['left_manifests']} manifests and {left['checkpoint_bytes'] / 2**20:.1f} MiB of checkpoint",
                  flush=True)
            row = {"pages": n, "manifests": len(items), **extra, **left, **start(srv, prefix, traced=False)}
            if "failed" not in row:
                mem = start(srv, prefix, traced=True)  # slower under tracemalloc: it may pass the limit
                if "traced_bytes" in mem:
                    row["bytes_per_object"] = mem["traced_bytes"] / max(1, mem["objects"])
            rows.append(row)
            print(f"  start {row['seconds']:.2f} s" + (f", FAILED: {row['failed']}" if "failed" in row else
                  f", {row['objects']} objects, {row.get('bytes_per_object', float('nan')):.0f} B of index per "
                  "object"), flush=True)
    finally:
        srv.stop()
    print("\n| pages of history | manifests written | left (checkpoint) | new instance starts in | "
          "index bytes per object |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pages']:,} | {r['manifests']:,} | {r['left_manifests']:,}"
              f" ({r['checkpoint_bytes'] / 2**20:.1f} MiB) | "
              + (f"failed after {r['seconds']:.1f} s" if "failed" in r else f"{r['seconds']:.2f} s")
              + f" | {r.get('bytes_per_object', float('nan')):.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"machine": f"{platform.node()} {os.cpu_count()} cores", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "objects_per_manifest": args.objects_per_manifest, "checkpoints": not args.no_checkpoints}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
