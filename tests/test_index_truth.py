"""The index over time, against real S3 servers: it heals when objects vanish or the server goes
away, it survives clocks that disagree and manifests that fail to load, and two writers of one
span agree on the stored bytes."""

from __future__ import annotations

import dataclasses
import os
import time

import boto3
import numpy as np
import pytest
from conftest import s3_tier
from engine_util import Pages, fingerprint, keys

from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache
from sglang_objectcache.engine.index import Index, ObjectInfo, pack_hashes
from sglang_objectcache.errors import Unavailable
from testbed.proxy import Proxy

FAST = {"index_refresh_interval": "200ms", "manifest_flush_interval": "100ms"}


def make(srv, prefix, endpoint=None, **tier) -> ObjectCache:
    t = s3_tier(srv, prefix, **{**FAST, **tier})
    if endpoint:
        t["endpoint"] = endpoint
    return ObjectCache(parse_config({"tiers": [t], "timeout": 5}), fingerprint("m"))


def eventually(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def written(srv, prefix, n=16, seed=1, **tier):
    """`n` pages written (8 to an object) and announced by one instance, which stays open."""
    a = make(srv, prefix, **tier)
    src, ks = Pages(n, seed=seed), keys(n)
    assert all(a.put(ks, src.segments()))
    a.flush()
    return a, src, ks


def delete(srv, names) -> None:
    s3 = boto3.client("s3", **srv.client_kwargs())
    for n in names:
        s3.delete_object(Bucket=srv.bucket, Key=n)


def object_of(cache, key) -> str:
    return cache.tiers[0].index.lookup(key)[0].name


@pytest.mark.parametrize("native", ["on", "off"])
def test_an_object_deleted_behind_our_back_is_forgotten_here_and_by_the_others(s3_env, prefix, native):
    a, src, ks = written(s3_env, prefix)
    b = make(s3_env, prefix, native_reads=native)
    try:
        assert b.exists(ks) == 16
        delete(s3_env, [object_of(a, ks[8])])
        dst = Pages.empty_like(src)
        assert b.get(ks, dst.segments()) == [True] * 8 + [False] * 8
        assert np.array_equal(dst.data[:8], src.data[:8]) and not dst.data[8:].any()
        assert b.exists(ks) == 8, "the reader forgets the missing object at once"
        assert b.snapshot()["counters"]["vanished"] >= 1
        assert eventually(lambda: a.exists(ks) == 8), "the writer learns it from the reader's manifest"
        # the prefix is written again and both claim it again
        assert all(a.put(ks, src.segments()))
        a.flush()
        assert eventually(lambda: b.exists(ks) == 16)
        assert b.get(ks, Pages.empty_like(src).segments()) == [True] * 16
    finally:
        a.close()
        b.close()


def test_a_whole_prefix_deleted_is_forgotten(s3_env, prefix):
    a, src, ks = written(s3_env, prefix, n=24)
    b = make(s3_env, prefix)
    try:
        delete(s3_env, {object_of(a, k) for k in ks})
        assert b.get(ks, Pages.empty_like(src).segments()) == [False] * 24
        # a fetch stops at the first missing page: each later object goes on the next call
        for _ in range(3):
            b.get(ks, Pages.empty_like(src).segments())
        assert b.exists(ks) == 0
        assert eventually(lambda: a.exists(ks) == 0)
    finally:
        a.close()
        b.close()


def test_another_instances_clear_is_healed_by_reading(s3_env, prefix):
    a, src, ks = written(s3_env, prefix)
    b = make(s3_env, prefix)
    try:
        assert b.exists(ks) == 16
        assert a.clear().result(30) >= 2  # deletes the namespace: objects and manifests
        for _ in range(2):
            assert not any(b.get(ks, Pages.empty_like(src).segments()))
        assert b.exists(ks) == 0
        c = make(s3_env, prefix)  # a new instance reads b's retractions too
        try:
            assert c.exists(ks) == 0
        finally:
            c.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("native", ["on", "off"])
def test_a_server_down_is_left_out_and_comes_back(s3_env, prefix, native):
    a, src, ks = written(s3_env, prefix)
    proxy = Proxy(s3_env.port)
    b = make(s3_env, prefix, endpoint=proxy.endpoint, native_reads=native, request_timeout="2s",
             max_retries=0)
    try:
        assert b.exists(ks) == 16
        proxy.down()
        assert b.get(ks, Pages.empty_like(src).segments()) == [False] * 16
        assert b.exists(ks) == 0, "a tier that cannot be reached sits out lookups"
        assert b.tiers[0].health.failures >= 1
        proxy.up()
        assert eventually(lambda: b.exists(ks) == 16, timeout=5), "and comes back by itself"
        dst = Pages.empty_like(src)
        assert b.get(ks, dst.segments()) == [True] * 16 and np.array_equal(dst.data, src.data)
        assert b.tiers[0].health.failures == 0
    finally:
        proxy.close()
        a.close()
        b.close()


def skew(cache: ObjectCache, seconds: float, measure: bool = True) -> None:
    """Run the cache's journal on a clock `seconds` off the machine's, as a skewed host would."""
    j = cache.tiers[0].journal
    j.clock = lambda: time.time() + seconds
    if measure:
        cache.runtime.run(j.sync_clock(), timeout=10)
    else:
        j.offset = 0.0


def test_clocks_ten_minutes_apart_see_each_others_writes(s3_env, prefix):
    caches = [make(s3_env, prefix) for _ in range(3)]
    try:
        for c, s in zip(caches, (600.0, -600.0, 0.0)):
            skew(c, s)
        assert [abs(c.tiers[0].journal.offset - o) < 3 for c, o in zip(caches, (-600, 600, 0))] == [True] * 3
        pages = []
        for i, c in enumerate(caches):
            src, ks = Pages(8, seed=i), keys(8, f"w{i}")
            assert all(c.put(ks, src.segments()))
            c.flush()
            pages.append(ks)
        for c in caches:
            assert eventually(lambda: all(c.exists(ks) == 8 for ks in pages), timeout=3)
    finally:
        for c in caches:
            c.close()


def test_a_manifest_named_in_the_future_does_not_hide_later_ones(s3_env, prefix):
    ahead, reader, later = (make(s3_env, prefix) for _ in range(3))
    try:
        skew(ahead, 600.0, measure=False)  # an instance that could not read the server's clock
        ks1 = keys(8, "ahead")
        assert all(ahead.put(ks1, Pages(8, seed=1).segments()))
        ahead.flush()
        assert eventually(lambda: reader.exists(ks1) == 8)
        ks2 = keys(8, "later")
        assert all(later.put(ks2, Pages(8, seed=2).segments()))
        later.flush()
        assert eventually(lambda: reader.exists(ks2) == 8, timeout=3)
    finally:
        for c in (ahead, reader, later):
            c.close()


def test_a_manifest_that_fails_to_load_is_tried_again(s3_env, prefix):
    b = make(s3_env, prefix)
    a = make(s3_env, prefix)
    store = b.tiers[0].store
    orig, failures = store.get, []

    async def flaky(path, **kw):
        if path.startswith(b.ns.manifest_prefix) and not failures:
            failures.append(path)
            raise Unavailable(f"GET {path}: injected")
        return await orig(path, **kw)
    store.get = flaky
    try:
        src, ks = Pages(8, seed=3), keys(8)
        assert all(a.put(ks, src.segments()))
        a.flush()
        assert eventually(lambda: b.exists(ks) == 8, timeout=3)
        assert len(failures) == 1
    finally:
        a.close()
        b.close()


def test_index_misses_do_not_each_send_a_list(s3_env, prefix):
    c = make(s3_env, prefix, index_refresh_interval="60s")
    try:
        lists = c.tiers[0].requests["list"]
        missing = keys(4, "nowhere")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            assert c.exists(missing) == 0
            time.sleep(0.005)
        time.sleep(1.2)
        assert c.tiers[0].requests["list"] - lists <= 2
    finally:
        c.close()


def test_two_writers_of_one_span_agree_on_the_stored_bytes(s3_env, prefix):
    """Prefill need not be bitwise deterministic: the loser of the create-only PUT adopts what is
    stored, announces its checksums, and nobody bans a good object."""
    a = make(s3_env, prefix, index_refresh_interval="60s")
    b = make(s3_env, prefix, index_refresh_interval="60s")
    try:
        ks = keys(8)
        first, second = Pages(8, seed=10), Pages(8, seed=11)
        assert all(a.put(ks, first.segments()))
        assert all(b.put(ks, second.segments())), "the loser's pages are stored: as the winner's bytes"
        theirs, mine = (c.tiers[0].index.lookup(ks[0])[0] for c in (a, b))
        assert theirs.digest == mine.digest
        dst = Pages.empty_like(first)
        assert b.get(ks, dst.segments()) == [True] * 8 and np.array_equal(dst.data, first.data)
        b.flush()
        c = make(s3_env, prefix)
        try:
            dst = Pages.empty_like(first)
            assert c.get(ks, dst.segments()) == [True] * 8 and np.array_equal(dst.data, first.data)
            assert "corrupt" not in b.snapshot()["counters"] and "corrupt" not in c.snapshot()["counters"]
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_a_ban_holds_for_the_same_checksums_only():
    idx = Index()
    bad = ObjectInfo("o", 1, 1, 8, 16, digest=1, hashes=pack_hashes(["k"]))
    idx.add(bad)
    idx.ban("o")
    idx.add(bad)
    assert "k" not in idx, "announced again as it was: still banned"
    idx.add(dataclasses.replace(bad, digest=2))
    assert "k" in idx, "other checksums describe other bytes: tried"


def test_a_disk_copy_deleted_behind_our_back_frees_its_budget(tmpdir_path):
    c = ObjectCache(parse_config({"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]}),
                    fingerprint("m"))
    try:
        src, ks = Pages(16, seed=4), keys(16)
        assert all(c.put(ks, src.segments()))
        used = c.tiers[0].budget.check()
        os.remove(os.path.join(tmpdir_path, object_of(c, ks[8])))
        assert c.get(ks, Pages.empty_like(src).segments()) == [True] * 8 + [False] * 8
        assert c.exists(ks) == 8
        assert c.tiers[0].budget.check() == used // 2, "the directory's budget is what the directory holds"
    finally:
        c.close()


def test_closing_while_a_manifest_is_on_its_way_loses_no_announcement(s3_env, prefix):
    """close() while the periodic flush's PUT is still in flight: the objects it carried are still
    announced (before, the cancelled PUT took its batch with it: objects nobody would ever find)."""
    import asyncio

    a = make(s3_env, prefix)
    store = a.tiers[0].store
    orig, slow = store.put, []

    async def slow_manifests(path, data, **kw):
        if path.startswith(a.ns.manifest_prefix) and not slow:
            slow.append(path)
            await asyncio.sleep(1.0)
        return await orig(path, data, **kw)
    store.put = slow_manifests
    src, ks = Pages(8, seed=5), keys(8)
    assert all(a.put(ks, src.segments()))
    assert eventually(lambda: bool(slow), timeout=2)  # the periodic flush is waiting on its PUT
    a.close()
    b = make(s3_env, prefix)
    try:
        assert b.exists(ks) == 8
    finally:
        b.close()
