"""Read-path study: engine read GiB/s against copy threads, connections and range size.

No SGLang needed (numpy pages of Llama-3.1-8B shape), so it runs on the GPU machine too. Writes
128 pages of 8 MiB once, then reads them back with each setting, twice, and prints the best of two,
next to a raw obstore read of the same objects' bytes.

    python benchmarks/read_path.py [--pages 128]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from transports import (GiB, LAYERS, PAGE_BYTES, PIECE, llama_fingerprint, page_keys,  # noqa: E402
                        raw_obstore, segments_of)

from sglang_objectcache.config import parse_config  # noqa: E402
from sglang_objectcache.engine.cache import ObjectCache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, default=128)
    ap.add_argument("--only", help="one setting, e.g. 4,32,8MiB (copy threads, connections, range)")
    ap.add_argument("--repeat", type=int, default=2, help="reads per setting; the best is printed")
    args = ap.parse_args()
    from sglang_objectcache.testbed import servers

    srv = servers.start_seaweedfs(memory_limit_mb=None)  # its temp dir goes when it stops
    os.environ.update(srv.env())
    try:
        n = args.pages
        pages = np.random.default_rng(0).integers(0, 256, size=(n, LAYERS, PIECE), dtype=np.uint8)
        fp = llama_fingerprint("rp")

        keys = page_keys(n)
        tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": "rp"}
        w = ObjectCache(parse_config({"tiers": [tier]}), fp)
        for i in range(0, n, 128):
            assert all(w.put(keys[i:i + 128], segments_of(pages[i:i + 128])))
        w.close()
        print(f"raw obstore (16 concurrent, 8 MiB objects): {raw_obstore(srv, n, 16)['get']:.3f} GiB/s")
        dst = np.zeros_like(pages)
        cores = os.cpu_count() or 1
        threads = sorted({1, 2, 4, min(8, cores)})
        settings = list(itertools.product(threads, (32, 64), ("8MiB", "16MiB")))
        if args.only:
            a, b, c = args.only.split(",")
            settings = [(int(a), int(b), c)]
        for copy_threads, conns, rng in settings:
            cfg = parse_config({"tiers": [{**tier, "max_connections": conns}], "copy_threads": copy_threads,
                                "read_range_bytes": rng})
            r = ObjectCache(cfg, fp)
            best = 0.0
            for _ in range(args.repeat):
                t = time.perf_counter()
                for i in range(0, n, 128):
                    assert all(r.get(keys[i:i + 128], segments_of(dst[i:i + 128])))
                best = max(best, n * PAGE_BYTES / GiB / (time.perf_counter() - t))
            r.close()
            print(f"copy_threads={copy_threads} max_connections={conns} read_range_bytes={rng}: {best:.3f} GiB/s",
                  flush=True)
        assert np.array_equal(dst, pages)
        return 0
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
