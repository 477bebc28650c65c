"""The server's raw read ceiling at several range sizes, without SGLang: a plain obstore client over
the same SeaweedFS set-up as benchmarks/e2e_gpu.py, on 64 MiB objects (a stored 8-page object).

    python benchmarks/gpu/ceiling.py --objects 128 --ranges 8,16,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/

from e2e_gpu import Bucket  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=128)
    ap.add_argument("--ranges", default="8,16,32", help="range sizes in MiB")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args(argv)
    import obstore as obs

    from testbed.servers import start_seaweedfs

    srv = start_seaweedfs(memory_limit_mb=None, reader_cache_mb=None)
    try:
        b = Bucket(srv, "ceil")
        blob = os.urandom(64 << 20)

        async def fill():
            sem = asyncio.Semaphore(32)

            async def one(i):
                async with sem:
                    await obs.put_async(b.store, f"ceil/d/{i:05d}", blob)
            await asyncio.gather(*[one(i) for i in range(args.objects)])
        t = time.perf_counter()
        asyncio.run(fill())
        out = {"put_gibps": round(args.objects * 64 / 1024 / (time.perf_counter() - t), 2)}
        objs = sorted(b.objects(), key=lambda o: o["path"])
        for mib in (int(x) for x in args.ranges.split(",")):
            r = b.ceiling(objs, range_bytes=mib << 20, concurrency=args.concurrency)
            out[f"range_{mib}mib_gibps"] = round(r[f"range_{mib}mib_gibps"], 2)
            out["whole_gibps"] = max(out.get("whole_gibps", 0), round(r["whole_gibps"], 2))
        print(json.dumps(out), flush=True)
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
