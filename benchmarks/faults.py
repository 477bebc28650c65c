"""The fault suite: what a caller of the backend sees when things break, on real S3 servers.

    python benchmarks/faults.py                        # SeaweedFS, and Ceph RGW where installed
    python benchmarks/faults.py --servers seaweedfs --out results/faults.json

Each scenario drives `ObjectCache` (the engine SGLang calls) through one fault and counts, with
every page checked byte for byte against what was written: what the calls returned (hits, misses,
errors raised into the caller: must be none), wrong KV returned (must be 0), acknowledged writes
lost (must be 0 under write_through: a page reported stored is readable afterwards), and the time
from the end of the fault to the first good read. One table, one row per scenario and server.

A server "cut" is a TCP proxy in front of it that refuses and resets every connection (the test
bed's `Proxy`), not a killed process: the shared server keeps its data, as a restarted one would.
The slow server is the same proxy passing 50 KB/s per connection. The full disk is a process whose
file size limit (RLIMIT_FSIZE) makes the write fail as ENOSPC would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402
from engine_util import Pages, fingerprint, keys  # noqa: E402

from sglang_objectcache.config import parse_config  # noqa: E402
from sglang_objectcache.engine.cache import ObjectCache  # noqa: E402
from sglang_objectcache.errors import StartupError  # noqa: E402

FAST = {"index_refresh_interval": "200ms", "manifest_flush_interval": "100ms", "request_timeout": "2s",
        "connect_timeout": "500ms", "max_retries": 0}


@dataclass
class Row:
    scenario: str
    server: str
    saw: str = ""  # what the caller saw
    hits: int = 0
    misses: int = 0
    raised: int = 0  # exceptions into the caller (must be 0)
    wrong_kv: int = 0  # pages returned as hits with wrong bytes (must be 0)
    acked_lost: int = 0  # pages reported stored, not readable afterwards (must be 0 for write_through)
    recover_s: float | None = None  # from the end of the fault to the first good read
    notes: list = field(default_factory=list)


class Bed:
    """One server, a fresh prefix per scenario, helpers to make caches and check pages."""

    def __init__(self, srv):
        self.srv = srv
        self.prefix = ""

    def fresh(self) -> None:
        self.prefix = f"faults-{uuid.uuid4().hex[:8]}"

    def tier(self, endpoint=None, **kw) -> dict:
        t = {"kind": "s3", "endpoint": endpoint or self.srv.endpoint, "bucket": self.srv.bucket,
             "prefix": self.prefix, **FAST, **kw}
        return t

    def cache(self, tiers=None, endpoint=None, **top) -> ObjectCache:
        cfg = {"tiers": tiers or [self.tier(endpoint)], "timeout": 5, **top}
        return ObjectCache(parse_config(cfg), fingerprint("faults"))

    def boto(self):
        import boto3

        return boto3.client("s3", **self.srv.client_kwargs())

    def data_objects(self) -> list[str]:
        s3 = self.boto()
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.srv.bucket, Prefix=self.prefix + "/"):
            out += [o["Key"] for o in page.get("Contents", []) if o["Key"].split("/")[-2] == "d"]
        return out


def check(row: Row, cache: ObjectCache, src: Pages, ks: list[str]) -> bool:
    """Read `ks` and count hits, misses, wrong bytes and raised errors into `row`; True if all hit."""
    dst = Pages.empty_like(src)
    try:
        ok = cache.get(ks, dst.segments())
    except Exception as e:  # noqa: BLE001 - counted: the backend must never raise into SGLang
        row.raised += 1
        row.notes.append(f"raised {type(e).__name__}")
        return False
    for i, hit in enumerate(ok):
        if hit:
            row.hits += 1
            if not np.array_equal(dst.data[i], src.data[i]):
                row.wrong_kv += 1
        else:
            row.misses += 1
    return all(ok)


def until_good(row: Row, cache: ObjectCache, src: Pages, ks: list[str], timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check(row, cache, src, ks):
            row.recover_s = time.monotonic() - t0
            return
        time.sleep(0.2)
    row.notes.append(f"not recovered after {timeout:.0f} s")


# ---- scenarios ----------------------------------------------------------------------------

def cut_mid_read(bed: Bed) -> Row:
    from testbed.proxy import Proxy

    row = Row("server cut mid-read, then back", bed.srv.kind)
    w = bed.cache()
    src, ks = Pages(32, seed=1), keys(32, "r")
    assert all(w.put(ks, src.segments()))
    w.flush()
    proxy = Proxy(bed.srv.port, rate=2e6)  # slow enough that the cut lands mid-read
    r = bed.cache(endpoint=proxy.endpoint)
    try:
        f = r.fetch(ks, Pages.empty_like(src).segments())
        time.sleep(0.3)
        proxy.down()
        ok = f.wait(10)
        row.misses += ok.count(False)
        row.hits += ok.count(True)
        proxy.rate = None
        proxy.up()
        until_good(row, r, src, ks)
        row.saw = "misses while cut, then hits"
    finally:
        r.close()
        w.close()
        proxy.close()
    return row


def cut_mid_write(bed: Bed) -> Row:
    from testbed.proxy import Proxy

    row = Row("server cut mid-write, then back", bed.srv.kind)
    proxy = Proxy(bed.srv.port)
    w = bed.cache(endpoint=proxy.endpoint)
    acked = []
    try:
        spans = [(Pages(8, seed=10 + i), keys(8, f"w{i}")) for i in range(12)]
        for i, (src, ks) in enumerate(spans):
            if i == 4:
                proxy.down()
            if i == 8:
                proxy.up()
            try:
                ok = w.put(ks, src.segments())
            except Exception:  # noqa: BLE001
                row.raised += 1
                continue
            if all(ok):
                acked.append((src, ks))
            else:
                row.notes.append(f"put {i}: not stored")
        w.flush()
    finally:
        w.close()
        proxy.close()
    r = bed.cache()
    try:
        for src, ks in acked:
            before = row.hits
            check(row, r, src, ks)
            row.acked_lost += 8 - (row.hits - before)
        row.saw = f"{12 - len(acked)} of 12 puts not stored while cut; every stored one readable"
    finally:
        r.close()
    return row


def slow_server(bed: Bed) -> Row:
    from testbed.proxy import Proxy

    row = Row("slow server (50 KB/s per connection), then fast again", bed.srv.kind)
    w = bed.cache()
    src, ks = Pages(32, seed=2), keys(32, "s")
    assert all(w.put(ks, src.segments()))
    w.flush()
    proxy = Proxy(bed.srv.port, rate=50e3)
    r = bed.cache(endpoint=proxy.endpoint)
    try:
        t0 = time.monotonic()
        check(row, r, src, ks)
        took = time.monotonic() - t0
        row.notes.append(f"the slow read returned after {took:.1f} s (timeout 5 s)")
        proxy.rate = None
        until_good(row, r, src, ks)
        row.saw = "misses at the deadline, never a hang; hits once the server is fast"
    finally:
        r.close()
        w.close()
        proxy.close()
    return row


def damaged(bed: Bed, how: str) -> Row:
    row = Row(f"{how} object", bed.srv.kind)
    w = bed.cache()
    src, ks = Pages(8, seed=3), keys(8, how)
    assert all(w.put(ks, src.segments()))
    w.flush()
    w.close()
    s3 = bed.boto()
    name = bed.data_objects()[0]
    body = bytearray(s3.get_object(Bucket=bed.srv.bucket, Key=name)["Body"].read())
    if how == "corrupt":
        body[len(body) // 3] ^= 0x40
    else:
        body = body[: len(body) // 2]
    s3.put_object(Bucket=bed.srv.bucket, Key=name, Body=bytes(body))
    r = bed.cache()
    try:
        check(row, r, src, ks)
        check(row, r, src, ks)  # banned now: a miss without a request
        row.saw = "miss, logged; the object is banned"
    finally:
        r.close()
    return row


def deleted_under_reader(bed: Bed) -> Row:
    row = Row("object deleted under a reader", bed.srv.kind)
    w = bed.cache()
    src, ks = Pages(8, seed=4), keys(8, "del")
    assert all(w.put(ks, src.segments()))
    w.flush()
    r = bed.cache()
    try:
        bed.boto().delete_object(Bucket=bed.srv.bucket, Key=bed.data_objects()[0])
        check(row, r, src, ks)
        row.notes.append(f"exists after the miss: {r.exists(ks)} (0: healed)")
        assert all(r.put(ks, src.segments()))  # SGLang recomputes the prefix here and writes it again
        r.flush()
        until_good(row, r, src, ks)
        row.saw = "one miss, then healed and served again once rewritten"
    finally:
        r.close()
        w.close()
    return row


def wrong_credentials(bed: Bed) -> Row:
    row = Row("wrong credentials at start", bed.srv.kind)
    env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_SECRET_ACCESS_KEY"] = "definitely-wrong"
    try:
        bed.cache()
        row.notes.append("started?!")
    except StartupError as e:
        row.saw = f"startup error: {str(e)[:70]}"
        row.notes.append("secret not in message" if "definitely-wrong" not in str(e) else "SECRET LEAKED")
    finally:
        for k, v in env.items():
            if v is not None:
                os.environ[k] = v
    return row


def revoked_credentials(bed: Bed) -> Row:
    """Keys revoked under a running backend (an expired token looks the same to it: 403s)."""
    row = Row("credentials revoked mid-run, then restored", bed.srv.kind)
    if bed.srv.kind != "ceph-rgw":
        row.saw = "n/a (keys are revoked with radosgw-admin)"
        return row
    from test_credentials import admin, write_credentials

    uid, key, secret = f"rev-{uuid.uuid4().hex[:8]}", f"K{uuid.uuid4().hex[:15]}".upper(), uuid.uuid4().hex
    admin(bed.srv, "user", "create", f"--uid={uid}", "--display-name=revoked", f"--access-key={key}",
          f"--secret-key={secret}")
    d = tempfile.mkdtemp(prefix="oc-faults-creds-")
    saved = {k: os.environ.pop(k, None) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(d, "credentials")
    write_credentials(os.environ["AWS_SHARED_CREDENTIALS_FILE"], key, secret)
    c = None
    try:
        c = bed.cache(tiers=[{**bed.tier(), "bucket": f"rev-{uuid.uuid4().hex[:8]}", "create_bucket": True}])
        src, ks = Pages(8, seed=8), keys(8, "rev")
        assert all(c.put(ks, src.segments()))
        admin(bed.srv, "key", "rm", f"--uid={uid}", "--key-type=s3", f"--access-key={key}")
        check(row, c, src, ks)
        more = c.put(keys(8, "rev2"), Pages(8, seed=9).segments())
        row.notes.append(f"a put while revoked: {sum(more)}/8 stored")
        admin(bed.srv, "key", "create", f"--uid={uid}", "--key-type=s3", f"--access-key={key}", f"--secret-key={secret}")
        time.sleep(1.5)  # the health window of the 403s ends
        until_good(row, c, src, ks)
        row.saw = "misses and unstored puts while revoked, never an exception; back by itself"
    finally:
        if c is not None:
            c.close()
        os.environ.pop("AWS_SHARED_CREDENTIALS_FILE", None)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
        shutil.rmtree(d, ignore_errors=True)
    return row


def missing_bucket(bed: Bed) -> Row:
    row = Row("missing bucket", bed.srv.kind)
    try:
        bed.cache(tiers=[{**bed.tier(), "bucket": f"missing-{uuid.uuid4().hex[:8]}"}])
    except StartupError as e:
        row.saw = f"startup error: {str(e)[:70]}"
    return row


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    from engine_util import Pages, fingerprint, keys
    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    c = ObjectCache(parse_config({"tiers": [{"kind": "disk", "path": sys.argv[2], "capacity": "1GiB"}]}),
                    fingerprint("faults"))
    ok = c.put(keys(8, "full"), Pages(8, seed=5).segments())
    print(sum(ok), c.exists(keys(8, "full")), c.snapshot()["counters"].get("errors", 0))
    c.close()
""")


def disk_full(bed: Bed) -> Row:
    row = Row("disk tier's disk full", "local disk")
    d = tempfile.mkdtemp(prefix="oc-faults-disk-")
    try:
        out = subprocess.run([sys.executable, "-c", DISK_FULL, ROOT, d], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            row.raised += 1
            row.notes.append(out.stderr.strip().splitlines()[-1][:100] if out.stderr else f"rc {out.returncode}")
        else:
            stored, exists, errors = (int(x) for x in out.stdout.split())
            row.misses = 8 - stored
            row.saw = f"put reported {stored}/8 stored, exists {exists}, {errors} errors counted"
            row.acked_lost = stored - exists if stored > exists else 0
        leftovers = [f for _, _, fs in os.walk(d) for f in fs if f.endswith(".tmp")]
        row.notes.append(f"{len(leftovers)} temporary files left")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return row


def two_writers(bed: Bed) -> Row:
    row = Row("two writers of one span, different bytes", bed.srv.kind)
    a, b = bed.cache(), bed.cache()
    try:
        ks = keys(8, "two")
        first, second = Pages(8, seed=6), Pages(8, seed=7)
        assert all(a.put(ks, first.segments())) and all(b.put(ks, second.segments()))
        a.flush()
        b.flush()
        for c in (a, b):
            check(row, c, first, ks)  # the bytes stored first win everywhere
        row.saw = "both read the stored (first) bytes; nothing banned"
        row.notes.append(f"corrupt counted: {a.snapshot()['counters'].get('corrupt', 0) + b.snapshot()['counters'].get('corrupt', 0)}")
    finally:
        a.close()
        b.close()
    return row


def gc_beside_readers(bed: Bed) -> Row:
    row = Row("garbage collection beside a reader", bed.srv.kind)
    w, r = bed.cache(), bed.cache()
    try:
        spans = [(Pages(8, seed=20 + i), keys(8, f"gc{i}")) for i in range(6)]
        for src, ks in spans:
            assert all(w.put(ks, src.segments()))
        w.flush()
        time.sleep(1.1)
        collector = w.tiers[0].collector
        collector.grace = 0.0
        total = sum(1 for _ in bed.data_objects())
        fut = w.runtime.submit(collector.run_once(capacity=int(total * spans[0][0].data.nbytes * 0.5)))
        for src, ks in spans:  # reads race the deletions
            check(row, r, src, ks)
        report = fut.result(30)
        for src, ks in spans:
            check(row, r, src, ks)
        row.saw = f"GC deleted {report.deleted} of {report.objects}: misses for those, hits for the rest"
    finally:
        w.close()
        r.close()
    return row


SCENARIOS = [cut_mid_read, cut_mid_write, slow_server, lambda b: damaged(b, "corrupt"),
             lambda b: damaged(b, "truncated"), deleted_under_reader, wrong_credentials, revoked_credentials, missing_bucket,
             two_writers, gc_beside_readers]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="seaweedfs,ceph", help="seaweedfs, ceph, or both")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "faults.json"))
    args = ap.parse_args(argv)
    from testbed import servers

    rows: list[Row] = []
    for kind in args.servers.split(","):
        if kind == "ceph" and not servers.ceph_available():
            print("Ceph RGW is not installed here: skipped", flush=True)
            continue
        print(f"starting {kind} ...", flush=True)
        srv = servers.start_seaweedfs(memory_limit_mb=None) if kind == "seaweedfs" else servers.start_ceph_rgw()
        os.environ.update(srv.env())
        bed = Bed(srv)
        try:
            for scenario in SCENARIOS:
                bed.fresh()
                t0 = time.monotonic()
                try:
                    row = scenario(bed)
                except Exception as e:  # noqa: BLE001 - a broken scenario is a row, not the end of the run
                    row = Row(getattr(scenario, "__name__", "scenario"), srv.kind, saw=f"SCENARIO FAILED: {e!r}"[:120])
                rows.append(row)
                print(f"  {row.scenario}: {row.saw} ({time.monotonic() - t0:.1f} s)", flush=True)
        finally:
            srv.stop()
    rows.append(disk_full(Bed(None)))
    print("\n| scenario | server | what the caller saw | hits | misses | raised | wrong KV | acked writes lost | "
          "recovered in |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = f"{r.recover_s:.1f} s" if r.recover_s is not None else "-"
        print(f"| {r.scenario} | {r.server} | {r.saw}{'; ' + '; '.join(r.notes) if r.notes else ''} | {r.hits} | "
              f"{r.misses} | {r.raised} | {r.wrong_kv} | {r.acked_lost} | {rec} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": {"machine": f"{platform.node()} {os.cpu_count()} cores",
                            "when": time.strftime("%Y-%m-%d %H:%M:%S")}, "rows": [asdict(r) for r in rows]}, f, indent=1)
    print(f"\nresults: {args.out}")
    bad = sum(r.wrong_kv + r.raised for r in rows) + sum(r.acked_lost for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
