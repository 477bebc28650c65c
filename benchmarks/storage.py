"""Storage benchmark: write then read the pages of long prefixes through SGLang's interface.

Llama-3.1-8B geometry (32 layers, 8 KV heads, head dim 128, bf16, page size 64: 8 MiB a page).
For each prefix length and backend, in one run against one S3 server:
  write GiB/s     batch_set_v1 in SGLang's 128-page batches, one after another (its backup thread)
  read GiB/s      batch_get_v1 the same way from a fresh instance (its prefetch IO thread)
  first page      latency of the first batch_get_v1 call: SGLang can use no page before it returns
  exists          batch_exists of 128 pages, median (SGLang's prefetch thread, every request)
  requests        S3 requests the backend issued, by verb
  CPU per GiB     CPU seconds of this process and of the server started here, per GiB read and written
next to the server's raw ceilings from a plain obstore client (whole-object PUT/GET, range GETs).
Bytes read back are checked against what was written.

Backends: objectcache (obstore, 8 pages per object), objectcache-ppo1 (one object per page),
objectcache-signed (PUT bodies signed: `sign_payload: true`, printed as a ratio to objectcache),
objectcache-aioboto3, objectcache-r8 (8 MiB read ranges, the default before 16 MiB),
objectcache-keyed (keyed integrity on: its read rate is printed as a ratio to objectcache's),
objectcache-https (the same server's https port, reads by the native reader over the system's
OpenSSL) and objectcache-https-obstore (https, reads through obstore), both printed as ratios to
objectcache over http, objectcache-nixl and objectcache-nixl-https (range reads through NIXL's
OBJ plugin, when nixl-cu12 is installed), and SGLang 0.5.23's own `seaweedfs` (when installed). With an https
backend and no --endpoint, the SeaweedFS started here also serves https, with a certificate from a
CA made for the run (needs the `openssl` command).

    python benchmarks/storage.py                         # starts its own SeaweedFS
    python benchmarks/storage.py --sizes 16k --backends objectcache,objectcache-ppo1,objectcache-aioboto3,seaweedfs
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # testbed: local S3 servers, CPU shims

from testbed import cpu_shims  # noqa: E402

PAGE, LAYERS, HEADS, DIM = 64, 32, 8, 128
PAGE_BYTES = PAGE * LAYERS * HEADS * DIM * 2 * 2
BATCH = 128  # SGLang's STORAGE_BATCH_SIZE
GiB = 2**30

BACKENDS = {
    "objectcache": {"pages_per_object": 8, "transport": "obstore"},
    "objectcache-ppo1": {"pages_per_object": 1, "transport": "obstore"},
    # PUT bodies signed (SigV4's SHA-256 over every byte written), as before sign_payload existed
    "objectcache-signed": {"pages_per_object": 8, "transport": "obstore", "tier": {"sign_payload": True}},
    "objectcache-aioboto3": {"pages_per_object": 8, "transport": "aioboto3"},
    "objectcache-r8": {"pages_per_object": 8, "transport": "obstore", "read_range_bytes": "8MiB"},
    # keyed integrity: every footer's MAC checked under a secret (from this environment variable)
    "objectcache-keyed": {"pages_per_object": 8, "transport": "obstore", "integrity_key_env": "OBJECTCACHE_BENCH_KEY"},
    # https on the same server (the run's CA as ca_bundle): the native reader over OpenSSL, and obstore
    "objectcache-https": {"pages_per_object": 8, "transport": "obstore", "https": True},
    "objectcache-https-obstore": {"pages_per_object": 8, "transport": "obstore", "https": True,
                                  "native_reads": "off"},
    # range reads through NIXL's OBJ plugin (nixl-cu12, when installed), over http and https
    "objectcache-nixl": {"pages_per_object": 8, "transport": "nixl"},
    "objectcache-nixl-https": {"pages_per_object": 8, "transport": "nixl", "https": True},
    # NIXL with the smallest GETs the planner makes (one layer block of an object, 2 MiB): a floor
    # on what landing straight in SGLang's host pool would cost, which needs a GET per 128 KiB (a
    # layer_first pool keeps each page's K and V apart; NIXL's OBJ plugin makes one GET per
    # descriptor); next to objectcache-nixl's 16 MiB ranges into staging
    "objectcache-nixl-segments": {"pages_per_object": 8, "transport": "nixl", "read_range_bytes": "128KiB"},
    "seaweedfs": None,
}


def chain_keys(n: int, salt: str) -> list[str]:
    """Page keys chained like SGLang's: each names the whole token path up to its page."""
    out, prev = [], salt.encode()
    for i in range(n):
        prev = hashlib.sha256(prev + i.to_bytes(4, "little")).digest()
        out.append(prev.hex())
    return out


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- raw ceilings ---------------------------------------------------------------------------


def raw_ceilings(srv, objects: int = 64, conc: int = 16) -> dict:
    """What a plain obstore client gets from the server: whole-object PUT/GET and range GETs."""
    import obstore as obs
    from obstore.store import S3Store

    store = S3Store(srv.bucket, endpoint=srv.endpoint, access_key_id=srv.access_key,
                    secret_access_key=srv.secret_key, region=srv.region,
                    client_options={"allow_http": True}, virtual_hosted_style_request=False)
    data = os.urandom(PAGE_BYTES)
    prefix = f"raw-{uuid.uuid4().hex[:8]}/"
    out = {}

    async def run():
        sem = asyncio.Semaphore(conc)

        async def put(i):
            async with sem:
                await obs.put_async(store, f"{prefix}{i}", data, use_multipart=False)

        async def get(i, rng=None):
            async with sem:
                if rng is None:
                    r = await obs.get_async(store, f"{prefix}{i % objects}")
                    return len(await r.bytes_async())
                start = (i * rng) % PAGE_BYTES
                b = await obs.get_range_async(store, f"{prefix}{i % objects}", start=start, end=start + rng)
                return len(b)

        t = time.perf_counter()
        await asyncio.gather(*(put(i) for i in range(objects)))
        out["put_8MiB"] = objects * PAGE_BYTES / GiB / (time.perf_counter() - t)
        for _ in range(2):  # the second pass is the one reported (warm connections)
            t = time.perf_counter()
            n = sum(await asyncio.gather(*(get(i) for i in range(objects))))
            out["get_8MiB"] = n / GiB / (time.perf_counter() - t)
        for mib in (1, 2, 4):
            reqs = objects * (8 // mib)
            t = time.perf_counter()
            n = sum(await asyncio.gather(*(get(i, mib << 20) for i in range(reqs))))
            out[f"range_{mib}MiB"] = n / GiB / (time.perf_counter() - t)
        await obs.delete_async(store, [f"{prefix}{i}" for i in range(objects)])

    asyncio.run(run())
    return out


# ---- backends -------------------------------------------------------------------------------


class Counted:
    """Counts a backend's S3 requests by verb."""

    def __init__(self, name: str, backend):
        self.name, self.backend = name, backend
        self.boto_counts: dict[str, int] = {}
        if name == "seaweedfs":
            backend._s3.meta.events.register("before-send.s3", self._count)

    def _count(self, request=None, **_):
        verb = request.method if request is not None else "?"
        self.boto_counts[verb] = self.boto_counts.get(verb, 0) + 1

    def requests(self) -> dict[str, int]:
        if self.name == "seaweedfs":
            return dict(self.boto_counts)
        out: dict[str, int] = {}
        for t in self.backend.cache.tiers:
            for verb, n in t.requests.items():
                out[verb.upper()] = out.get(verb.upper(), 0) + n
        return out

    def close(self):
        if self.name == "seaweedfs":
            self.backend._executor.shutdown(wait=True)
        else:
            self.backend.close()


def make_backend(name: str, srv, prefix: str, pool):
    from testbed.sglang_pools import storage_config

    cfg_kw = dict(mla=False, layout="layer_first", model="Llama-3.1-8B")
    if name == "seaweedfs":
        from sglang.srt.mem_cache.storage.seaweedfs.seaweedfs_store import SeaweedFSStore

        extra = {"endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix,
                 "access_key": srv.access_key, "secret_key": srv.secret_key}
        b = SeaweedFSStore(storage_config(extra=extra, **cfg_kw), pool)
        b.register_mem_pool_host(pool)
        return Counted(name, b)
    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    opts = BACKENDS[name]
    tier = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix,
            "transport": opts["transport"], **opts.get("tier", {})}
    if opts.get("https"):
        tier.update(endpoint=srv.https_endpoint, ca_bundle=srv.ca_bundle,
                    **({"native_reads": opts["native_reads"]} if "native_reads" in opts else {}))
    extra = {"tiers": [tier], "pages_per_object": opts["pages_per_object"],
             **{k: v for k, v in opts.items() if k not in ("transport", "pages_per_object", "https", "native_reads", "tier")}}
    return Counted(name, ObjectCacheStorage(storage_config(extra=extra, **cfg_kw), pool))


def pool_digest(pool, n_pages: int) -> str:
    import torch

    view = pool.kv_buffer[:, :, : n_pages * PAGE].contiguous().view(torch.uint8)
    return hashlib.sha256(view.numpy().tobytes()).hexdigest()


def bench_one(name: str, srv, pool, n_pages: int, reps_exists: int = 20) -> dict:
    import torch

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    keys = chain_keys(n_pages, prefix)
    idx = torch.arange(n_pages * PAGE, dtype=torch.int64)
    total = n_pages * PAGE_BYTES
    want = pool_digest(pool, n_pages)
    res: dict = {"backend": name, "pages": n_pages, "tokens": n_pages * PAGE, "bytes": total}

    w = make_backend(name, srv, prefix, pool)
    c0, s0, t0 = cpu_seconds(), srv.cpu_seconds(), time.perf_counter()
    ok = True
    for i in range(0, n_pages, BATCH):
        ok &= all(w.backend.batch_set_v1(keys[i : i + BATCH], idx[i * PAGE : (i + BATCH) * PAGE]))
    res["write_s"] = time.perf_counter() - t0
    res["write_cpu_s"] = cpu_seconds() - c0
    s1 = srv.cpu_seconds()
    res["write_server_cpu_s"] = s1 - s0 if s0 is not None and s1 is not None else None
    res["write_ok"] = bool(ok)
    res["write_gibps"] = total / GiB / res["write_s"]
    res["write_requests"] = w.requests()
    w.close()

    t0 = time.perf_counter()
    r = make_backend(name, srv, prefix, pool)  # fresh instance: empty memory, index from S3
    res["startup_s"] = time.perf_counter() - t0
    probe = keys[:BATCH]
    lat = []
    for _ in range(reps_exists):
        t = time.perf_counter()
        hit = r.backend.batch_exists(probe)
        lat.append(time.perf_counter() - t)
    res["exists_hit"] = hit
    res["exists_ms"] = statistics.median(lat) * 1e3
    pool.kv_buffer[:, :, : n_pages * PAGE].zero_()
    before = r.requests()
    c0, s0, t0 = cpu_seconds(), srv.cpu_seconds(), time.perf_counter()
    first = None
    got = 0
    for i in range(0, n_pages, BATCH):
        flags = r.backend.batch_get_v1(keys[i : i + BATCH], idx[i * PAGE : (i + BATCH) * PAGE])
        got += sum(flags)
        if first is None:
            first = time.perf_counter() - t0
    res["read_s"] = time.perf_counter() - t0
    res["read_cpu_s"] = cpu_seconds() - c0
    s1 = srv.cpu_seconds()
    res["read_server_cpu_s"] = s1 - s0 if s0 is not None and s1 is not None else None
    res["first_page_ms"] = first * 1e3
    res["read_gibps"] = total / GiB / res["read_s"]
    res["read_pages_ok"] = got
    after = r.requests()
    res["read_requests"] = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) - before.get(k, 0)}
    res["bytes_equal"] = pool_digest(pool, n_pages) == want
    r.close()
    return res


def parse_sizes(text: str) -> list[int]:
    out = []
    for s in text.split(","):
        s = s.strip().lower()
        out.append(int(s[:-1]) * 1024 if s.endswith("k") else int(s))
    return out


def table(results: list[dict], raw: dict) -> str:
    lines = ["| prefix | backend | write GiB/s | read GiB/s | first page ms | exists(128) ms | "
             "startup s | read requests | write requests | bytes equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['tokens'] // 1024}K | {r['backend']} | {r['write_gibps']:.3f} | {r['read_gibps']:.3f} | "
            f"{r['first_page_ms']:.0f} | {r['exists_ms']:.3f} | {r['startup_s']:.2f} | "
            f"{sum(r['read_requests'].values())} | {sum(r['write_requests'].values())} | {r['bytes_equal']} |")
    lines.append("")
    lines.append("raw ceilings (obstore, 16 concurrent, 8 MiB objects): " + ", ".join(
        f"{k} {v:.3f} GiB/s" for k, v in raw.items()))
    return "\n".join(lines)


def ratios(results: list[dict], raw: dict) -> list[str]:
    out = []
    by = {(r["tokens"], r["backend"]): r for r in results}
    for (tokens, name), r in sorted(by.items()):
        if not name.startswith("objectcache"):
            continue
        line = (f"{tokens // 1024}K {name}: read {r['read_gibps'] / raw['get_8MiB']:.0%} of raw GET, "
                f"write {r['write_gibps'] / raw['put_8MiB']:.0%} of raw PUT")
        plain = by.get((tokens, "objectcache"))
        if name == "objectcache-keyed" and plain:
            line += (f"; keyed integrity on / off: read x{r['read_gibps'] / plain['read_gibps']:.3f}, write "
                     f"x{r['write_gibps'] / plain['write_gibps']:.3f}")
        label = {"objectcache-signed": "signed PUT bodies", "objectcache-https": "native https", "objectcache-https-obstore": "obstore https",
                 "objectcache-nixl": "nixl http", "objectcache-nixl-https": "nixl https",
                 "objectcache-nixl-segments": "nixl 2 MiB GETs"}.get(name)
        if label and plain:
            line += (f"; {label} / http native: read x{r['read_gibps'] / plain['read_gibps']:.3f}, write "
                     f"x{r['write_gibps'] / plain['write_gibps']:.3f}")
        gib = r["bytes"] / GiB
        if r.get("read_server_cpu_s") is not None:
            line += (f"; CPU seconds per GiB read: client {r['read_cpu_s'] / gib:.2f}, server "
                     f"{r['read_server_cpu_s'] / gib:.2f}")
        if r.get("write_server_cpu_s") is not None:
            line += (f"; per GiB written: client {r['write_cpu_s'] / gib:.2f}, server "
                     f"{r['write_server_cpu_s'] / gib:.2f}")
        peer = by.get((tokens, "seaweedfs"))
        if peer:
            line += (f"; vs seaweedfs: read x{r['read_gibps'] / peer['read_gibps']:.2f}, write "
                     f"x{r['write_gibps'] / peer['write_gibps']:.2f}, exists x{peer['exists_ms'] / r['exists_ms']:.0f} "
                     f"faster, first page x{peer['first_page_ms'] / r['first_page_ms']:.2f}")
        out.append(line)
    return out


def main(argv=None) -> int:
    os.environ.setdefault("OBJECTCACHE_BENCH_KEY", hashlib.sha256(uuid.uuid4().bytes).hexdigest())
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4k,16k,64k", help="prefix lengths in tokens (k = 1024)")
    ap.add_argument("--backends", default="objectcache,objectcache-https,objectcache-https-obstore,objectcache-nixl,"
                    "objectcache-nixl-https,seaweedfs")
    ap.add_argument("--endpoint", help="use this server instead of starting SeaweedFS (credentials from "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, bucket from --bucket)")
    ap.add_argument("--bucket", default="kv-cache")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "storage.json"))
    args = ap.parse_args(argv)

    cpu_shims.install()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import sglang.srt.mem_cache.memory_pool  # noqa: F401
    import torch

    cpu_shims.install_cpu_hicache_patches()
    from testbed import servers
    from testbed.sglang_pools import make_host_pool

    sizes = parse_sizes(args.sizes)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    for n in names:
        if n not in BACKENDS:
            ap.error(f"unknown backend {n}; choose from {', '.join(BACKENDS)}")
    from sglang_objectcache.stores import nixl_reader

    if any(n.startswith("objectcache-nixl") for n in names) and nixl_reader.available():
        print(f"skipping the nixl rows: {nixl_reader.available()}")
        names = [n for n in names if not n.startswith("objectcache-nixl")]
    if "seaweedfs" in names:
        try:
            import sglang.srt.mem_cache.storage.seaweedfs.seaweedfs_store  # noqa: F401
        except ImportError:
            print("SGLang's seaweedfs backend is not in this SGLang (0.5.23 has it); skipping it")
            names.remove("seaweedfs")

    owned = False  # whether this run started the server (and so stops it)
    if args.endpoint and any(BACKENDS[n] and BACKENDS[n].get("https") for n in names):
        print("https backends need the server this run starts; skipping them with --endpoint")
        names = [n for n in names if not (BACKENDS[n] and BACKENDS[n].get("https"))]
    if args.endpoint:
        srv = servers.S3Server(kind="external", endpoint=args.endpoint,
                               access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
                               secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""), bucket=args.bucket)
    elif any(BACKENDS[n] and BACKENDS[n].get("https") for n in names):
        from testbed.tls import start_seaweedfs_tls

        print("starting SeaweedFS with https (a certificate from a CA made for this run) ...", flush=True)
        certs_dir = Path(tempfile.mkdtemp(prefix="oc-bench-tls-"))
        srv, over_tls, certs = start_seaweedfs_tls(certs_dir, memory_limit_mb=None)
        srv.https_endpoint, srv.ca_bundle = over_tls.endpoint, certs["ca"]
        srv.certs_dir = certs_dir
        owned = True
    else:
        print("starting SeaweedFS (a temporary directory, removed at the end) ...", flush=True)
        srv = servers.start_seaweedfs(memory_limit_mb=None)
        owned = True
    os.environ.update(srv.env())
    try:
        max_pages = max(sizes) // PAGE
        print(f"host pool: {max_pages} pages of {PAGE_BYTES >> 20} MiB (Llama-3.1-8B, page 64, layer_first)",
              flush=True)
        pool = make_host_pool("mha", "layer_first", page_size=PAGE, layers=LAYERS, heads=HEADS, head_dim=DIM,
                              tokens=PAGE * 2, host_tokens=max_pages * PAGE, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        raw = pool.kv_buffer.view(torch.uint8)
        chunk = 1 << 28
        flat = raw.view(-1)
        for s in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - s)
            flat[s : s + n] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        print("raw ceilings ...", flush=True)
        ceil = raw_ceilings(srv)
        print("  " + ", ".join(f"{k} {v:.3f} GiB/s" for k, v in ceil.items()), flush=True)
        results = []
        for tokens in sizes:
            for name in names:
                print(f"{tokens // 1024}K tokens, {name} ...", flush=True)
                r = bench_one(name, srv, pool, tokens // PAGE)
                print(f"  write {r['write_gibps']:.3f} GiB/s, read {r['read_gibps']:.3f} GiB/s, first page "
                      f"{r['first_page_ms']:.0f} ms, exists {r['exists_ms']:.3f} ms, equal {r['bytes_equal']}",
                      flush=True)
                results.append(r)
        print()
        print(table(results, ceil))
        print()
        for line in ratios(results, ceil):
            print(line)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        meta = {"machine": f"{platform.node()} {os.cpu_count()} cores", "python": sys.version.split()[0],
                "when": time.strftime("%Y-%m-%d %H:%M:%S"), "server": srv.kind, "page_bytes": PAGE_BYTES}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "raw": ceil, "results": results}, f, indent=1)
        print(f"\nresults: {args.out}")
        bad = [r for r in results if not (r["bytes_equal"] and r["write_ok"])]
        return 1 if bad else 0
    finally:
        if owned:
            srv.stop()
            if getattr(srv, "certs_dir", None):
                shutil.rmtree(srv.certs_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
