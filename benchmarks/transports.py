"""Transport benchmark: the objectcache engine over obstore vs aioboto3, next to raw clients.

Needs no SGLang (pages live in a numpy array shaped like Llama-3.1-8B pages: 32 layers x 256 KiB),
so it also runs on the GPU machine, where SGLang 0.5.23 is not installed. One run, one server:
  raw obstore / raw aioboto3   whole 8 MiB GETs and PUTs at 16 concurrent requests, plain clients
  engine obstore / aioboto3    ObjectCache.put / .get of the same pages, 128-page calls
  engine, 1 page per object    the same with one object per page (the granularity question)
  engine, checksums off        what verifying every piece on read costs

    python benchmarks/transports.py                 # starts its own SeaweedFS
    python benchmarks/transports.py --pages 512 --endpoint http://127.0.0.1:8333 --bucket kv-cache
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # testbed: local S3 servers

from sglang_objectcache.config import parse_config  # noqa: E402
from sglang_objectcache.engine.cache import ObjectCache  # noqa: E402
from sglang_objectcache.keys import Fingerprint  # noqa: E402

LAYERS, PIECE = 32, 256 << 10  # Llama-3.1-8B, page 64, bf16: K+V of one layer of one page
PAGE_BYTES = LAYERS * PIECE


def llama_fingerprint(model: str) -> Fingerprint:
    """The pool geometry every engine benchmark uses: Llama-3.1-8B, page 64, bf16, TP 1."""
    return Fingerprint(model, "bfloat16", 64, LAYERS, 0, PIECE, "mha", 8, 128, 128, 0, 1)


def page_keys(n: int) -> list[str]:
    """n distinct 64-hex page keys, shaped like SGLang's."""
    return [f"{i:064x}" for i in range(n)]
GiB = 2**30


def segments_of(arr: np.ndarray):
    """Segments of a [pages, layers, piece] array: K and V halves of each piece, as an MHA host
    pool gives them; plain integer arithmetic, like SGLang's precomputed pointers."""
    base, half = arr.ctypes.data, PIECE // 2

    def segs(layer: int, i: int):
        a = base + (i * LAYERS + layer) * PIECE
        return [(a, half), (a + half, half)]

    return segs


def table_of(arr: np.ndarray):
    """`segments_of` as an array (format.SegmentTable), what SGLang's pools hand the engine."""
    from sglang_objectcache.format import SegmentTable

    pages, half = arr.shape[0], PIECE // 2
    base = arr.ctypes.data + (np.arange(pages)[None, :] * LAYERS + np.arange(LAYERS)[:, None]) * PIECE
    addr = np.stack([base, base + half], axis=-1)  # [layer, page, part]
    return SegmentTable(np.stack([addr, np.full_like(addr, half)], axis=-1))


def raw_obstore(srv, objects: int, conc: int) -> dict:
    import obstore as obs
    from obstore.store import S3Store

    st = S3Store(srv.bucket, endpoint=srv.endpoint, access_key_id=srv.access_key,
                 secret_access_key=srv.secret_key, region=srv.region,
                 client_options={"allow_http": True}, virtual_hosted_style_request=False)
    data, pre = os.urandom(PAGE_BYTES), f"rawo-{uuid.uuid4().hex[:6]}/"

    async def run():
        sem = asyncio.Semaphore(conc)

        async def put(i):
            async with sem:
                await obs.put_async(st, f"{pre}{i}", data, use_multipart=False)

        async def get(i):
            async with sem:
                return len(await (await obs.get_async(st, f"{pre}{i}")).bytes_async())

        t = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(objects)))
        put_rate = objects * PAGE_BYTES / GiB / (time.perf_counter() - t)
        rates = []
        for _ in range(2):
            t = time.perf_counter()
            n = sum(await asyncio.gather(*(get(i) for i in range(objects))))
            rates.append(n / GiB / (time.perf_counter() - t))
        await obs.delete_async(st, [f"{pre}{i}" for i in range(objects)])
        return {"put": put_rate, "get": max(rates)}

    return asyncio.run(run())


def raw_aioboto3(srv, objects: int, conc: int) -> dict:
    import aioboto3

    data, pre = os.urandom(PAGE_BYTES), f"rawa-{uuid.uuid4().hex[:6]}/"

    async def run():
        from aiobotocore.config import AioConfig

        async with aioboto3.Session().client("s3", config=AioConfig(max_pool_connections=conc),
                                             **srv.client_kwargs()) as s3:
            sem = asyncio.Semaphore(conc)

            async def put(i):
                async with sem:
                    await s3.put_object(Bucket=srv.bucket, Key=f"{pre}{i}", Body=data)

            async def get(i):
                async with sem:
                    r = await s3.get_object(Bucket=srv.bucket, Key=f"{pre}{i}")
                    async with r["Body"] as b:
                        return len(await b.read())

            t = time.perf_counter()
            await asyncio.gather(*(put(i) for i in range(objects)))
            put_rate = objects * PAGE_BYTES / GiB / (time.perf_counter() - t)
            rates = []
            for _ in range(2):
                t = time.perf_counter()
                n = sum(await asyncio.gather(*(get(i) for i in range(objects))))
                rates.append(n / GiB / (time.perf_counter() - t))
            for i in range(objects):
                await s3.delete_object(Bucket=srv.bucket, Key=f"{pre}{i}")
            return {"put": put_rate, "get": max(rates)}

    return asyncio.run(run())


def engine(srv, transport: str, pages: np.ndarray, conc: int, ppo: int = 8, verify: bool = True) -> dict:
    n = len(pages)
    prefix = f"eng-{uuid.uuid4().hex[:6]}"
    fp = llama_fingerprint("bench")
    tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix,
            "transport": transport, "max_connections": conc}
    keys = page_keys(n)
    c = ObjectCache(parse_config({"tiers": [tier], "pages_per_object": ppo}), fp)
    t = time.perf_counter()
    for i in range(0, n, 128):
        assert all(c.put(keys[i:i + 128], segments_of(pages[i:i + 128])))
    put_rate = n * PAGE_BYTES / GiB / (time.perf_counter() - t)
    c.close()
    r = ObjectCache(parse_config({"tiers": [tier], "pages_per_object": ppo, "verify_checksums": verify}),
                    fp)  # fresh reader
    dst = np.zeros_like(pages)
    rates = []
    for _ in range(2):
        t = time.perf_counter()
        for i in range(0, n, 128):
            assert all(r.get(keys[i:i + 128], segments_of(dst[i:i + 128])))
        rates.append(n * PAGE_BYTES / GiB / (time.perf_counter() - t))
    equal = bool(np.array_equal(dst, pages))
    r.clear().result(timeout=60)
    r.close()
    return {"put": put_rate, "get": max(rates), "bytes_equal": equal}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=128, help="8 MiB pages per case")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--endpoint")
    ap.add_argument("--bucket", default="kv-cache")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "transports.json"))
    args = ap.parse_args(argv)
    from testbed import servers

    owned = False  # whether this run started the server (and so stops it)
    if args.endpoint:
        srv = servers.S3Server(kind="external", endpoint=args.endpoint, bucket=args.bucket,
                               access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
                               secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    else:
        srv = servers.start_seaweedfs(memory_limit_mb=None)  # its temp dir goes when it stops
        owned = True
    os.environ.update(srv.env())
    try:
        pages = np.random.default_rng(0).integers(0, 256, size=(args.pages, LAYERS, PIECE), dtype=np.uint8)
        res = {"raw obstore": raw_obstore(srv, args.pages, args.concurrency),
               "raw aioboto3": raw_aioboto3(srv, args.pages, args.concurrency),
               "engine obstore": engine(srv, "obstore", pages, args.concurrency),
               "engine aioboto3": engine(srv, "aioboto3", pages, args.concurrency),
               "engine obstore, 1 page per object": engine(srv, "obstore", pages, args.concurrency, ppo=1),
               "engine obstore, checksums off": engine(srv, "obstore", pages, args.concurrency, verify=False)}
        print(f"{args.pages} pages of 8 MiB, {args.concurrency} concurrent, {os.cpu_count()} cores\n")
        print("| client | PUT GiB/s | GET GiB/s |\n|---|---|---|")
        for k, v in res.items():
            print(f"| {k} | {v['put']:.3f} | {v['get']:.3f} |")
        print(f"\nengine read, obstore / aioboto3: x{res['engine obstore']['get'] / res['engine aioboto3']['get']:.2f}")
        ok = all(v.get("bytes_equal", True) for v in res.values())
        print(f"bytes equal: {ok}")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": f"{platform.node()} {os.cpu_count()} cores", "pages": args.pages,
                       "when": time.strftime("%Y-%m-%d %H:%M:%S"), "results": res}, f, indent=1)
        return 0 if ok else 1
    finally:
        if owned:
            srv.stop()


if __name__ == "__main__":
    sys.exit(main())
