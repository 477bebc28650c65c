"""Garbage collection against real S3 servers: a byte budget kept least recently used first (reads
by any instance count), a maximum age, orphans, one collector at a time, and deletions that are
misses everywhere, never wrong KV."""

from __future__ import annotations

import time

import boto3
import numpy as np
import pytest
from engine_util import Pages, keys
from test_checkpoints import listed
from test_index_truth import eventually, make


def bucket_bytes(srv, prefix) -> int:
    s3 = boto3.client("s3", **srv.client_kwargs())
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=srv.bucket, Prefix=prefix + "/"):
        total += sum(o["Size"] for o in page.get("Contents", []) if o["Key"].split("/")[-2] == "d")
    return total


def spans(cache, n: int, tag: str):
    """n objects of 8 pages each, written by `cache`; [(keys, pages)]."""
    out = []
    for i in range(n):
        src, ks = Pages(8, seed=100 + i), keys(8, f"{tag}{i}")
        assert all(cache.put(ks, src.segments()))
        out.append((ks, src))
    cache.flush()
    return out


def run_gc(cache, **kw):
    t = cache.tiers[0]
    t.collector.grace = 0.0
    return cache.runtime.run(t.collector.run_once(**kw), timeout=30)


def test_over_budget_the_least_recently_read_go_first_whoever_read_them(s3_env, prefix):
    a = make(s3_env, prefix)  # writes, then collects
    b = make(s3_env, prefix)  # reads the hot set
    try:
        written = spans(a, 6, "s")
        size = bucket_bytes(s3_env, prefix) // 6
        time.sleep(2.5)  # uses are kept to the second, by clocks each within half a second of the server's
        b.tiers[0].journal.use_every = 0.0
        hot = [written[1], written[4]]
        for ks, src in hot:
            assert eventually(lambda: b.exists(ks) == 8)
            assert b.get(ks, Pages.empty_like(src).segments()) == [True] * 8
        b.flush()
        ja = a.tiers[0].journal
        a.runtime.run(ja.refresh(), timeout=10)
        assert a.tiers[0].index.used(a.tiers[0].index.lookup(hot[0][0][0])[0].name) > \
            a.tiers[0].index.used(a.tiers[0].index.lookup(written[0][0][0])[0].name)
        r = run_gc(a, capacity=int(2.5 * size))
        assert r.objects == 6 and r.deleted == 4 and r.unindexed == 0
        assert bucket_bytes(s3_env, prefix) <= 2.5 * size
        for ks, src in hot:  # the hot ones stay and are served
            dst = Pages.empty_like(src)
            assert b.get(ks, dst.segments()) == [True] * 8 and np.array_equal(dst.data, src.data)
        cold = [w for w in written if w not in hot]
        assert all(a.exists(ks) == 0 for ks, _ in cold), "the collector forgets them at once"
        # the reader stops claiming them within a refresh (the retraction), or at its first read
        for ks, src in cold:
            dst = Pages.empty_like(src)
            got = b.get(ks, dst.segments())
            assert got == [False] * 8 and not dst.data.any()
            assert b.exists(ks) == 0
    finally:
        a.close()
        b.close()


def test_max_age_deletes_what_nobody_used_for_that_long(s3_env, prefix):
    a = make(s3_env, prefix)
    try:
        old = spans(a, 2, "old")
        time.sleep(2.1)
        fresh = spans(a, 1, "new")
        r = run_gc(a, max_age=1.5)
        assert r.deleted == 2 and r.expired == 2
        assert all(a.exists(ks) == 0 for ks, _ in old) and a.exists(fresh[0][0]) == 8
        assert r.deleted_bytes == r.bytes - bucket_bytes(s3_env, prefix)
    finally:
        a.close()


def test_objects_nobody_announced_count_and_can_go(s3_env, prefix):
    a = make(s3_env, prefix)
    try:
        s3 = boto3.client("s3", **s3_env.client_kwargs())
        orphan = f"{a.ns.root}d/{'0' * 64}-8"  # written by a writer that died before its manifest
        s3.put_object(Bucket=s3_env.bucket, Key=orphan, Body=b"x" * 100_000)
        time.sleep(2.5)  # more than our clock's error against the server's (whole seconds, halved)
        spans(a, 1, "s")
        time.sleep(1.1)
        r = run_gc(a, dry_run=True, capacity=10)
        assert r.objects == 2 and r.unindexed == 1 and r.deleted == 2 and r.dry_run
        assert bucket_bytes(s3_env, prefix) == r.bytes, "a dry run deletes nothing"
        r = run_gc(a, capacity=r.bytes - 60_000)  # down to 90% of it: the orphan's 100 KB are enough
        assert r.deleted == 1 and r.deleted_bytes == 100_000, "the orphan, older, goes first"
        assert orphan not in listed(s3_env, prefix, "d")
    finally:
        a.close()


def test_one_collector_at_a_time_and_a_dead_one_is_replaced(s3_env, prefix):
    a, b = make(s3_env, prefix), make(s3_env, prefix)
    try:
        ca, cb = a.tiers[0].collector, b.tiers[0].collector
        ca.lease_ttl = cb.lease_ttl = 2.0
        assert a.runtime.run(ca.take_lease(), timeout=10)
        assert not b.runtime.run(cb.take_lease(), timeout=10), "held by a"
        assert a.runtime.run(ca.take_lease(), timeout=10), "the holder renews"
        assert len(listed(s3_env, prefix, "g")) == 1, "older leases are deleted"
        assert not b.runtime.run(cb.take_lease(), timeout=10)
        time.sleep(3.2)  # a stops renewing (it crashed): its lease runs out (S3 times are whole seconds)
        assert b.runtime.run(cb.take_lease(), timeout=10)
        assert not a.runtime.run(ca.take_lease(), timeout=10), "and a, back, does not take it from b"
    finally:
        a.close()
        b.close()


def test_the_backend_keeps_its_budget_by_itself(s3_env, prefix):
    a = make(s3_env, prefix)
    size = None
    try:
        spans(a, 1, "probe")
        size = bucket_bytes(s3_env, prefix)
    finally:
        a.close()
    b = make(s3_env, prefix, capacity=int(3.5 * size), gc_interval="500ms")
    try:
        b.tiers[0].collector.grace = 0.0
        spans(b, 6, "w")
        assert eventually(lambda: bucket_bytes(s3_env, prefix) <= 3.5 * size, timeout=15)
        stats = lambda: b.snapshot()["tiers"][b.tiers[0].name]  # noqa: E731
        assert eventually(lambda: stats()["gc_deleted"] >= 3), stats()  # a pass ends after its deletions
        assert stats()["stored_bytes"] <= 3.5 * size
    finally:
        b.close()


def test_a_bucket_lifecycle_rule_expires_objects_and_readers_heal(s3_env, prefix):
    """The alternative to `capacity`: a lifecycle rule on the prefix (docs/operations.md). Ceph
    RGW runs here with a lifecycle "day" of 10 s (testbed); SeaweedFS has no expiration by rule."""
    if s3_env.kind != "ceph-rgw":
        pytest.skip("SeaweedFS does not run S3 lifecycle expiration rules")
    s3 = boto3.client("s3", **s3_env.client_kwargs())
    a = make(s3_env, prefix)
    b = make(s3_env, prefix)
    try:
        written = spans(a, 2, "lc")
        assert all(eventually(lambda ks=ks: b.exists(ks) == 8) for ks, _ in written)
        s3.put_bucket_lifecycle_configuration(Bucket=s3_env.bucket, LifecycleConfiguration={"Rules": [
            {"ID": f"expire-{prefix}", "Filter": {"Prefix": f"{prefix}/"}, "Status": "Enabled",
             "Expiration": {"Days": 1}}]})
        try:
            assert eventually(lambda: bucket_bytes(s3_env, prefix) == 0, timeout=180), "expired by the rule"
        finally:
            s3.delete_bucket_lifecycle(Bucket=s3_env.bucket)
        for ks, src in written:  # the reader still claims them: one miss each, then it knows
            dst = Pages.empty_like(src)
            assert b.get(ks, dst.segments()) == [False] * 8 and not dst.data.any()
            assert b.exists(ks) == 0
        assert b.snapshot()["counters"]["vanished"] >= 2
    finally:
        a.close()
        b.close()
