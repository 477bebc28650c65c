"""How soon does a range's first layer come? The server's side of layer 0, without the engine.

Received piece by piece, layer 0 of a prefix is ready once the first 2 MiB (one layer of an 8-page
Llama-3.1-8B object) of every object's first range are in place. This asks SeaweedFS for the first
ranges of `conc` stored 64 MiB objects at once, with the package's native reader on one thread
each, and times (in C, as the engine does) when each range's first 2 MiB and its end arrived:

- `first`: `conc` first ranges alone (16 MiB = 8 layers, or 2 MiB = 1 layer);
- `mixed`: as the engine's plan starts a 1 GiB prefix, 16 first ranges and 16 second ranges of
  the same objects at once, timed on the first ranges.

It prints, per case, the median and slowest time to the first 2 MiB (what gates layer 0), the
slowest end, and the aggregate rate, medians over `--reps`.

    python benchmarks/first_bytes.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MIB = 1 << 20
LAYER = 2 * MIB  # one layer of 8 pages of 256 KiB
OBJECT = 64 * MIB


def timed_reads(reader, reads, layer_bytes=LAYER):
    """Start `reads` ((key, start, end)) together, a thread each; per read, seconds from the start to
    its first `layer_bytes` and to its end."""
    from sglang_objectcache import native
    from sglang_objectcache.engine.readiness import LayerReadiness
    from sglang_objectcache.stores.rawhttp import APPLIED, RangePieces

    jobs = []
    for key, s, e in reads:
        n = (e - s) // layer_bytes
        target = np.empty(e - s, dtype=np.uint8)
        offs = np.arange(n, dtype=np.uint64) * layer_bytes
        copies = np.stack([target.ctypes.data + offs, offs, np.full(n, layer_bytes, dtype=np.uint64)], axis=-1)
        pieces = RangePieces(offs, layer_bytes, None, copies.astype(np.uint64), np.arange(n + 1, dtype=np.int64),
                             l0=0, per_layer=1)
        jobs.append((key, s, e, pieces, target, LayerReadiness(n, [1] * n)))
    go, ends = threading.Barrier(len(jobs) + 1), [0.0] * len(jobs)

    def run(i):
        key, s, e, pieces, _, layers = jobs[i]
        go.wait()
        assert reader.read_pieces(key, s, e, pieces, native.CopyGate(), layers) == APPLIED
        ends[i] = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    go.wait()
    for t in threads:
        t.join()
    return [(j[5].ready_at[0] - t0, end - t0) for j, end in zip(jobs, ends)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--objects", type=int, default=32)
    args = ap.parse_args(argv)
    from sglang_objectcache.stores.credentials import Credentials
    from sglang_objectcache.stores.rawhttp import RawRangeReader
    from sglang_objectcache.testbed import servers

    srv = servers.start_seaweedfs(memory_limit_mb=None)
    try:
        client = servers._s3_client(srv.endpoint, srv.access_key, srv.secret_key, srv.region)
        body = np.random.default_rng(0).integers(0, 256, OBJECT, dtype=np.uint8).tobytes()
        keys = [f"fb/o{i:03d}" for i in range(args.objects)]
        for k in keys:
            client.put_object(Bucket=srv.bucket, Key=k, Body=body)
        reader = RawRangeReader(endpoint=srv.endpoint, bucket=srv.bucket, region=srv.region,
                                creds=Credentials(srv.access_key, srv.secret_key), request_timeout=30,
                                connect_timeout=5, max_idle=64)
        cases = {}
        for conc in (8, 16, 32):
            for size in (16 * MIB, 2 * MIB):
                cases[f"first: {conc} x {size // MIB} MiB"] = ([(k, 0, size) for k in keys[:conc]], conc)
        cases["mixed: 16 first + 16 second, 16 MiB"] = (
            [(k, 0, 16 * MIB) for k in keys[:16]] + [(k, 16 * MIB, 32 * MIB) for k in keys[:16]], 16)
        timed_reads(reader, [(k, 0, 16 * MIB) for k in keys[:32]])  # warm the connections and the server
        print(f"{os.cpu_count()} cores; SeaweedFS on loopback; ms from the common start, medians of {args.reps}:")
        for name, (reads, timed) in cases.items():
            rows = []
            for _ in range(args.reps):
                res = timed_reads(reader, reads)
                firsts = [f for f, _ in res[:timed]]
                end = max(e for _, e in res)
                rows.append((statistics.median(firsts), max(firsts), end,
                             sum(e - s for _, s, e in reads) / end / 2**30))
            med = [statistics.median(r[i] for r in rows) for i in range(4)]
            print(f"  {name:38s} first 2 MiB: median {med[0] * 1e3:6.1f}, slowest {med[1] * 1e3:6.1f};  "
                  f"all done {med[2] * 1e3:6.1f}  ({med[3]:.2f} GiB/s)", flush=True)
        reader.close()
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
