"""The engine against real S3 servers: round trips, sharing, faults, tiers, startup errors."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import boto3
import numpy as np
import pytest
from conftest import s3_tier
from engine_util import Pages, fingerprint, keys

from sglang_objectcache import native as native_mod
from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.index import pack_hashes
from sglang_objectcache.engine.cache import ObjectCache, StartupError
from testbed import servers


def make(tiers, **top) -> ObjectCache:
    model = top.pop("model", "m")
    return ObjectCache(parse_config({"tiers": tiers, **top}), fingerprint(model))


def boto(srv):
    return boto3.client("s3", **srv.client_kwargs())


@pytest.mark.parametrize("transport", ["obstore", "aioboto3"])
def test_round_trip_objects_and_index(s3_env, prefix, transport):
    c = make([s3_tier(s3_env, prefix, transport=transport)], pages_per_object=8)
    try:
        src, ks = Pages(20, seed=1), keys(20)
        assert c.put(ks, src.segments()) == [True] * 20
        assert c.exists(ks) == 20
        assert c.exists(ks[:5] + keys(3, "other")) == 5
        dst = Pages.empty_like(src)
        assert c.get(ks, dst.segments()) == [True] * 20
        assert np.array_equal(src.data, dst.data)
        # 20 pages at 8 per object: 3 data objects, one PUT each; writing again writes nothing
        assert c.snapshot()["tiers"][c.tiers[0].name]["objects"] == 3
        puts = c.tiers[0].requests["put"]
        assert c.put(ks, src.segments()) == [True] * 20
        assert c.tiers[0].requests["put"] == puts
        # a read of a middle run uses the objects that hold it and lands in the right places
        mid = Pages.empty_like(src)
        assert c.get(ks[6:14], mid.segments(list(range(6, 14)))) == [True] * 8
        assert np.array_equal(mid.data[6:14], src.data[6:14])
    finally:
        c.close()


@pytest.mark.parametrize("sign", [False, True])
def test_puts_sign_their_body_only_when_asked(s3_env, prefix, sign):
    """UNSIGNED-PAYLOAD by default (no SHA-256 pass over every byte written; the objects' own
    checksums guard the body), a signed body with sign_payload: true; both servers accept both."""
    import re

    from testbed.proxy import Proxy

    proxy = Proxy(s3_env.port, record=True)
    c = make([s3_tier(s3_env, prefix, endpoint=proxy.endpoint, transport="obstore", sign_payload=sign,
                      native_reads="off")], pages_per_object=4)
    try:
        src, ks = Pages(8, seed=3), keys(8)
        assert c.put(ks, src.segments()) == [True] * 8
        c.flush()  # the manifest: a PUT too
        dst = Pages.empty_like(src)
        assert c.get(ks, dst.segments()) == [True] * 8
        assert np.array_equal(src.data, dst.data)
        with proxy._lock:
            sent = bytes(proxy.sent)
        heads = re.findall(rb"PUT /[^ ]+ HTTP/1\.1\r\n(.*?)\r\n\r\n", sent, re.S)
        assert len(heads) >= 3, "two data objects and a manifest"
        values = [re.search(rb"(?im)^x-amz-content-sha256: *(\S+)", h).group(1) for h in heads]
        if sign:
            assert all(re.fullmatch(rb"[0-9a-f]{64}", v) for v in values), values
        else:
            assert set(values) == {b"UNSIGNED-PAYLOAD"}
    finally:
        c.close()
        proxy.close()


def test_encode_buffers_are_reused_only_after_their_writes_succeeded(s3_env, prefix):
    """obstore sends a buffer without copying it: one whose PUT succeeded is reused (the kernel
    need not zero fresh pages for every object), one whose PUT failed is never handed out again
    (a transfer may still read it), and what is read back is what was written either way."""
    from testbed.proxy import Proxy

    proxy = Proxy(s3_env.port)
    c = make([s3_tier(s3_env, prefix, endpoint=proxy.endpoint, transport="obstore", max_retries=0,
                      request_timeout=1, native_reads="off")], pages_per_object=2, timeout=3)
    try:
        pool = c.writer.buffers
        data = [(Pages(6, seed=40 + i), keys(6, f"b{i}")) for i in range(3)]
        for src, ks in data:
            assert c.put(ks, src.segments()) == [True] * 6
        assert pool.reused >= 6, "the second and third puts encode into the first one's buffers"
        for src, ks in data:  # every object intact, though written from reused buffers
            dst = Pages.empty_like(src)
            assert c.get(ks, dst.segments()) == [True] * 6
            assert np.array_equal(src.data, dst.data)
        held = list(pool._free)
        proxy.down()
        src, ks = Pages(6, seed=50), keys(6, "down")
        assert not any(c.put(ks, src.segments()))
        # the failed put took the free buffers and gave none back
        assert all(not any(b is h for h in pool._free) for b in held)
        assert pool._free == []
    finally:
        c.close()
        proxy.close()


def test_get_stops_at_first_missing_page(s3_env, prefix):
    c = make([s3_tier(s3_env, prefix)])
    try:
        src, ks = Pages(6, seed=2), keys(6)
        assert all(c.put(ks[:3], src.segments()))
        dst = Pages.empty_like(src)
        assert c.get(ks, dst.segments()) == [True, True, True, False, False, False]
        assert not dst.data[3:].any()
    finally:
        c.close()


def test_fresh_process_finds_pages_and_reads_equal_bytes(s3_env, prefix):
    a = make([s3_tier(s3_env, prefix)])
    src, ks = Pages(12, seed=3), keys(12)
    assert all(a.put(ks, src.segments()))
    a.close()  # publishes the manifest
    code = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from engine_util import Pages, fingerprint, keys
        from sglang_objectcache.config import parse_config
        from sglang_objectcache.engine.cache import ObjectCache
        c = ObjectCache(parse_config({{"tiers": [{s3_tier(s3_env, prefix)!r}]}}), fingerprint("m"))
        ks = keys(12); src = Pages(12, seed=3); dst = Pages.empty_like(src)
        n = c.exists(ks); ok = c.get(ks, dst.segments())
        print("RESULT", n, all(ok), bool(np.array_equal(src.data, dst.data)), c.tiers[0].requests["put"])
        c.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ})
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr[-2000:]
    assert line[0].split()[1:] == ["12", "True", "True", "0"]


def test_another_instance_sees_new_writes_within_default_delay(s3_env, prefix):
    b = make([s3_tier(s3_env, prefix)])  # started first: its index is empty
    a = make([s3_tier(s3_env, prefix)])
    try:
        src, ks = Pages(4, seed=4), keys(4)
        assert b.exists(ks) == 0
        assert all(a.put(ks, src.segments()))
        t0 = time.monotonic()
        while b.exists(ks) < 4 and time.monotonic() - t0 < 5.0:
            time.sleep(0.05)
        assert b.exists(ks) == 4, "not visible within the documented 5 s default"
        dst = Pages.empty_like(src)
        assert all(b.get(ks, dst.segments()))
        assert np.array_equal(src.data, dst.data)
    finally:
        a.close()
        b.close()


def _only_data_object(srv, prefix):
    objs = [o["Key"] for o in boto(srv).list_objects_v2(Bucket=srv.bucket, Prefix=prefix)["Contents"]]
    data = [k for k in objs if "/d/" in k]
    assert len(data) == 1
    return data[0]


@pytest.mark.parametrize("table", [False, True], ids=["fn", "table"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_damaged_object_is_a_logged_miss(s3_env, prefix, caplog, damage, table):
    a = make([s3_tier(s3_env, prefix)])
    src, ks = Pages(4, seed=5), keys(4)
    assert all(a.put(ks, src.segments()))
    a.close()
    name = _only_data_object(s3_env, prefix)
    body = bytearray(boto(s3_env).get_object(Bucket=s3_env.bucket, Key=name)["Body"].read())
    if damage == "flip":
        body[len(body) // 2] ^= 0x01
    elif damage == "truncate":
        body = body[: len(body) - 100]
    else:
        body = bytearray(os.urandom(len(body)))
    boto(s3_env).put_object(Bucket=s3_env.bucket, Key=name, Body=bytes(body))
    b = make([s3_tier(s3_env, prefix)])
    try:
        dst = Pages.empty_like(src)
        with caplog.at_level(logging.WARNING, logger="sglang_objectcache"):
            assert b.get(ks, dst.segments(table=table)) == [False] * 4
        assert dst.only_verified_from(src), "a damaged object must not write unchecked bytes into the targets"
        assert "corrupt" in caplog.text
        assert b.snapshot()["counters"]["corrupt"] == 1
        assert b.exists(ks) == 0  # forgotten after the failed read
    finally:
        b.close()


@pytest.mark.parametrize("range_bytes", ["8MiB", "16KiB"])  # one whole read / several range reads
def test_object_of_another_fingerprint_never_loads(s3_env, prefix, range_bytes):
    cfg = parse_config({"tiers": [s3_tier(s3_env, prefix)], "read_range_bytes": range_bytes})
    a = ObjectCache(cfg, fingerprint("m", dtype="float16"))
    b = ObjectCache(cfg, fingerprint("m", dtype="bfloat16"))
    try:
        src, ks = Pages(3, seed=6), keys(3)
        assert all(a.put(ks, src.segments()))
        assert a.ns.root != b.ns.root
        assert b.exists(ks) == 0
        # even an index entry pointing at the other deployment's object is never read
        info = a.tiers[0].index.lookup(ks[0])[0]
        b.tiers[0].index.add(dataclasses.replace(info, hashes=pack_hashes(ks)))
        dst = Pages.empty_like(src)
        assert b.get(ks, dst.segments()) == [False] * 3
        assert not dst.data.any()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("transport", ["obstore", "aioboto3"])
def test_server_down_gives_misses_within_timeout_then_recovers(prefix, tmpdir_path, transport, monkeypatch):
    srv = servers.start_seaweedfs(data_dir=tmpdir_path)
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    tier = s3_tier(srv, prefix, transport=transport, request_timeout=1, connect_timeout=0.5, max_retries=1)
    c = make([tier], timeout=3)
    try:
        src, ks = Pages(8, seed=7), keys(8)
        assert all(c.put(ks[:4], src.segments()))
        port = srv.port
        srv.stop()
        dst = Pages.empty_like(src)
        t0 = time.monotonic()
        assert c.get(ks[:4], dst.segments()) == [False] * 4
        assert c.put(ks[4:], src.segments(list(range(4, 8)))) == [False] * 4
        assert time.monotonic() - t0 < 2 * 3 + 1.0, "each call must end within its deadline"
        assert not dst.data.any()
        counters = c.snapshot()["counters"]
        assert counters.get("read_errors_Unavailable", 0) >= 1 and counters.get("write_errors_Unavailable", 0) >= 1
        srv = servers.start_seaweedfs(data_dir=tmpdir_path, port=port)
        deadline = time.monotonic() + 20
        ok = []
        while time.monotonic() < deadline:
            ok = c.get(ks[:4], dst.segments())
            if all(ok):
                break
            time.sleep(0.5)
        assert all(ok), "the backend must recover when the server returns"
        assert np.array_equal(dst.data[:4], src.data[:4])
        assert all(c.put(ks[4:], src.segments(list(range(4, 8)))))
    finally:
        c.close()
        srv.stop()


def test_disk_tier_respects_capacity_and_rebuilds_its_index(tmpdir_path):
    obj = 8 * 4 * 8192 + 4096  # 8 pages per object, plus the header block
    tier = {"kind": "disk", "path": tmpdir_path, "capacity": int(obj * 2.5)}
    c = make([tier], pages_per_object=8)
    src, ks = Pages(32, seed=8), keys(32)
    try:
        assert all(c.put(ks[:16], src.segments()))  # two objects, older
        assert all(c.put(ks[16:], src.segments(list(range(16, 32)))))  # two newer ones
        st = c.snapshot()["tiers"][c.tiers[0].name]
        assert st["used_bytes"] <= st["capacity_bytes"]
        assert c.exists(ks) == 0  # the oldest objects left first
        assert c.exists(ks[16:]) == 16  # the two newest stayed
    finally:
        c.close()
    again = make([tier], pages_per_object=8)
    try:
        assert again.exists(ks[16:]) == 16
        dst = Pages.empty_like(src)
        assert all(again.get(ks[16:], dst.segments(list(range(16, 32)))))
        assert np.array_equal(dst.data[16:], src.data[16:])
    finally:
        again.close()


def test_write_back_fills_lower_tier_and_reads_promote(s3_env, prefix, tmpdir_path):
    disk = {"kind": "disk", "path": os.path.join(tmpdir_path, "a"), "capacity": "1GiB"}
    c = make([disk, s3_tier(s3_env, prefix)], write_policy="write_back")
    src, ks = Pages(8, seed=9), keys(8)
    try:
        assert all(c.put(ks, src.segments()))
        assert c.tiers[0].index.n_pages == 8
        c.flush()
        assert c.tiers[1].index.n_pages == 8
    finally:
        c.close()
    disk_b = {"kind": "disk", "path": os.path.join(tmpdir_path, "b"), "capacity": "1GiB"}
    b = make([disk_b, s3_tier(s3_env, prefix)])
    try:
        assert b.tiers[0].index.n_pages == 0 and b.exists(ks) == 8
        dst = Pages.empty_like(src)
        assert all(b.get(ks, dst.segments()))
        assert np.array_equal(src.data, dst.data)
        b.flush()
        assert b.tiers[0].index.n_pages == 8  # promoted into the disk tier
        s3_gets = b.tiers[1].requests["get"]
        assert all(b.get(ks, Pages.empty_like(src).segments()))
        assert b.tiers[1].requests["get"] == s3_gets  # served from disk now
    finally:
        b.close()


def test_clear_removes_only_this_namespace(s3_env, prefix):
    mine = make([s3_tier(s3_env, prefix)], model="mine")
    other = make([s3_tier(s3_env, prefix)], model="other")
    try:
        src, ks = Pages(3, seed=10), keys(3)
        assert all(mine.put(ks, src.segments()))
        assert all(other.put(ks, src.segments()))
        mine.flush()
        other.flush()
        assert mine.clear().result(timeout=30) > 0
        assert mine.exists(ks) == 0
        left = [o["Key"] for o in boto(s3_env).list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)
                .get("Contents", [])]
        assert left and all(k.startswith(other.ns.root) for k in left)
        assert other.exists(ks) == 3
    finally:
        mine.close()
        other.close()


def test_threads_share_one_engine(s3_env, prefix):
    c = make([s3_tier(s3_env, prefix)], pages_per_object=4)
    errors = []

    def worker(w: int) -> None:
        try:
            src, ks = Pages(8, seed=100 + w), keys(8, f"w{w}")
            for _ in range(3):
                assert all(c.put(ks, src.segments()))
                dst = Pages.empty_like(src)
                assert all(c.get(ks, dst.segments()))
                assert np.array_equal(src.data, dst.data)
                assert c.exists(ks) == 8
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
    finally:
        c.close()


@pytest.mark.parametrize("transport", ["obstore", "aioboto3"])
def test_startup_errors_name_the_cause_and_hide_the_secret(seaweedfs, monkeypatch, transport):
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    base = {"kind": "s3", "endpoint": seaweedfs.endpoint, "bucket": seaweedfs.bucket,
            "transport": transport, "request_timeout": 2, "connect_timeout": 0.5, "max_retries": 0}
    with pytest.raises(StartupError, match=r"tiers\[0\]\.endpoint: cannot reach .*start the server"):
        make([{**base, "endpoint": "http://127.0.0.1:9"}])
    with pytest.raises(StartupError, match=r"tiers\[0\]\.bucket: bucket 'no-such-bucket' does not exist"):
        make([{**base, "bucket": "no-such-bucket"}])
    # names that hold the other status code: the probe's own object name is echoed in the error
    with pytest.raises(StartupError, match=r"bucket 'no-such-bucket' does not exist"):
        make([{**base, "bucket": "no-such-bucket", "prefix": "p403p"}])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(StartupError, match="rejected the credentials") as e:
        make([base])
    assert "definitely-wrong-secret" not in str(e.value)
    with pytest.raises(StartupError, match="rejected the credentials"):
        make([{**base, "prefix": "p404p"}])


@pytest.mark.parametrize("table", [False, True], ids=["fn", "table"])
def test_damaged_range_of_a_ranged_read_is_a_miss(s3_env, prefix, caplog, table):
    """Objects larger than read_range_bytes are read in ranges verified against the footer's
    checksums; a flipped byte in any range fails the whole object's pages."""
    cfg = parse_config({"tiers": [s3_tier(s3_env, prefix)], "read_range_bytes": "16KiB"})
    a = ObjectCache(cfg, fingerprint("m"))
    src, ks = Pages(4, seed=12), keys(4)
    assert all(a.put(ks, src.segments()))
    a.close()
    name = _only_data_object(s3_env, prefix)
    body = bytearray(boto(s3_env).get_object(Bucket=s3_env.bucket, Key=name)["Body"].read())
    body[3 * 4 * 8192 + 5] ^= 0x10  # layer 3, a data byte
    boto(s3_env).put_object(Bucket=s3_env.bucket, Key=name, Body=bytes(body))
    b = ObjectCache(cfg, fingerprint("m"))
    try:
        with caplog.at_level(logging.WARNING, logger="sglang_objectcache"):
            dst = Pages.empty_like(src)
            assert b.get(ks, dst.segments(table=table)) == [False] * 4
        assert "checksum mismatch at layer 3" in caplog.text
        assert dst.only_verified_from(src)
        # one manifest GET at start, then one range per 32 KiB layer block and, beside them, the
        # footer (a new instance holds none)
        assert b.tiers[0].requests["get"] == 1 + 4 + 1
    finally:
        b.close()


def _written_then_reader(srv, prefix, seed, native="off", pages=4, **top):
    """`pages` pages written by one instance; a fresh reader that reads them one layer per range
    (unless `top` sets read_range_bytes). Returns the source pages, keys and the reader."""
    if native == "on" and native_mod.http_get() is None:
        pytest.skip(f"native helper unavailable: {native_mod.status()}")
    cfg = parse_config({"tiers": [s3_tier(srv, prefix, native_reads=native)], "read_range_bytes": "32KiB", **top})
    a = ObjectCache(cfg, fingerprint("m"))
    src, ks = Pages(pages, seed=seed), keys(pages)
    assert all(a.put(ks, src.segments()))
    a.close()
    return src, ks, ObjectCache(cfg, fingerprint("m"))


def _delay_reads(tier, delay) -> None:
    """Make the tier's range reads wait delay(start) seconds first: on the loop for the store's
    reads, on the pull thread (blocking, as a slow server would) for the native reader's."""
    if tier.range_reader is None:
        orig = tier.read_range

        async def slow(name, start, end):
            import asyncio

            await asyncio.sleep(delay(start))
            return await orig(name, start, end)
        tier.read_range = slow
    else:
        http = tier.range_reader.http
        orig_into, orig_pieces = http.read_into, http.read_pieces

        def slow_into(key, start, end, dst):
            time.sleep(delay(start))
            return orig_into(key, start, end, dst)

        def slow_pieces(key, start, end, pieces, gate, layers=None):
            time.sleep(delay(start))
            return orig_pieces(key, start, end, pieces, gate, layers)
        http.read_into = slow_into
        http.read_pieces = slow_pieces


@pytest.mark.parametrize("native,table", [("off", False), ("on", False), ("on", True)],
                         ids=["store", "native-staged", "native-pieces"])
def test_layers_become_ready_in_order_while_later_ones_are_in_flight(s3_env, prefix, native, table):
    """A fetch reports layer readiness as ranges land: here one range per layer, delayed per
    layer by the store, so layer 0 is ready while the last layer is still on the wire."""
    src, ks, b = _written_then_reader(s3_env, prefix, seed=13, native=native)
    _delay_reads(b.tiers[0], lambda start: 0.3 * (start // (4 * 8192)))  # layer l lands l * 0.3 s late
    try:
        dst = Pages.empty_like(src)
        f = b.fetch(ks, dst.segments(table=table))
        assert f.readiness.wait(0, 5)
        assert not f.readiness.is_ready(3), "the last layer should still be in flight"
        assert np.array_equal(dst.data[:, 0], src.data[:, 0])
        assert not dst.data[:, 3].any()
        assert f.wait(10) == [True] * 4
        if native == "off":  # (pulled reads settle on their thread, before their task ends)
            assert not f._futs, "landed reads (and their bytes) are let go"
        assert np.array_equal(dst.data, src.data)
        assert f.readiness.ready_at == sorted(f.readiness.ready_at)
    finally:
        b.close()


@pytest.mark.parametrize("native,table", [("off", False), ("on", False), ("on", True)],
                         ids=["store", "native-staged", "native-pieces"])
def test_failed_fetch_releases_layer_waiters_with_a_reason(s3_env, prefix, native, table):
    """A read stuck past the deadline: the fetch returns at its deadline (not when the read ends),
    and the late bytes are never copied into the caller's pages."""
    src, ks, b = _written_then_reader(s3_env, prefix, seed=14, native=native, timeout=1)
    _delay_reads(b.tiers[0], lambda start: 3.0 if start >= 3 * 4 * 8192 else 0.0)  # layer 3 comes late
    try:
        dst = Pages.empty_like(src)
        f = b.fetch(ks, dst.segments(table=table))
        t0 = time.monotonic()
        assert f.wait(1.0) == [False] * 4
        assert time.monotonic() - t0 < 2.5
        assert not f.readiness.wait(3, 0) and "deadline" in f.readiness.failed
        time.sleep(2.5)  # the stuck read lands now: it must not reach the pages
        assert not dst.data[:, 3].any()
    finally:
        b.close()


@pytest.mark.parametrize("policy", ["srpt", "fair"])
def test_concurrent_fetches_share_a_bandwidth_cap(s3_env, prefix, policy):
    """Two equal fetches under a 4 MiB/s cap: srpt serves one, then the other; fair shares it.
    Either way the cap holds and every byte arrives."""
    cfg = parse_config({"tiers": [s3_tier(s3_env, prefix)], "read_range_bytes": "64KiB",
                        "bandwidth": "4MiB", "fetch_policy": policy})
    a = ObjectCache(cfg, fingerprint("m"))
    srcs = [Pages(32, seed=20 + i) for i in range(2)]
    ks = [keys(32, f"req{i}") for i in range(2)]
    for src, k in zip(srcs, ks):
        assert all(a.put(k, src.segments()))
    a.close()
    b = ObjectCache(cfg, fingerprint("m"))
    try:
        dsts = [Pages.empty_like(s) for s in srcs]
        t0 = time.monotonic()
        fetches = [b.fetch(k, d.segments()) for k, d in zip(ks, dsts)]
        done = [None, None]

        def waiter(i):
            fetches[i].wait(30)
            done[i] = time.monotonic() - t0

        threads = [threading.Thread(target=waiter, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        total = sum(f.plan.nbytes for f in fetches)  # 2 MiB
        assert max(done) >= 0.9 * total / (4 << 20), "the cap was exceeded"
        assert max(done) < 3 * total / (4 << 20)
        for f, s, d in zip(fetches, srcs, dsts):
            assert f.wait(0) == [True] * 32 and np.array_equal(s.data, d.data)
        first, second = sorted(done)
        if policy == "srpt":
            assert first < 0.7 * second  # one at a time
        else:
            assert first > 0.8 * second  # together
    finally:
        b.close()


def test_switch_interval_is_lowered_only_while_reads_are_in_flight(s3_env, prefix):
    """`switch_interval` is process-wide: it holds while a fetch runs and is Python's own again
    once the fetch has ended (before `wait` returns), and 0 never touches it."""
    was = sys.getswitchinterval()
    cfg = parse_config({"tiers": [s3_tier(s3_env, prefix)], "switch_interval": "0.3ms", "bandwidth": "1MiB"})
    c = ObjectCache(cfg, fingerprint("m"))
    try:
        assert sys.getswitchinterval() == was  # open, idle: untouched
        src, ks = Pages(8, seed=23), keys(8)
        assert all(c.put(ks, src.segments()))
        dst = Pages.empty_like(src)
        f = c.fetch(ks, dst.segments())  # 256 KiB at 1 MiB/s: about a quarter of a second
        assert sys.getswitchinterval() == pytest.approx(0.0003)
        assert f.wait(30) == [True] * 8 and np.array_equal(dst.data, src.data)
        assert sys.getswitchinterval() == was
    finally:
        c.close()
    c = ObjectCache(parse_config({"tiers": [s3_tier(s3_env, prefix)], "switch_interval": 0}), fingerprint("m"))
    try:
        f = c.fetch(ks, Pages.empty_like(src).segments())
        assert sys.getswitchinterval() == was
        assert all(f.wait(30))
    finally:
        c.close()


def test_switch_interval_nests_across_fetches():
    from sglang_objectcache.engine import switch

    was = sys.getswitchinterval()
    switch.enter(0.0003)
    switch.enter(0.0003)
    switch.leave(0.0003)
    assert sys.getswitchinterval() == pytest.approx(0.0003)  # one fetch still reads
    switch.leave(0.0003)
    assert sys.getswitchinterval() == was


def test_overlapping_holders_get_the_smallest_interval_any_asks_for():
    """A storage-query window (1 ms) open while a read (0.2 ms) runs must not slow the read."""
    from sglang_objectcache.engine import switch

    was = sys.getswitchinterval()
    switch.enter(0.001)
    assert sys.getswitchinterval() == pytest.approx(0.001)
    switch.enter(0.0002)
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    switch.leave(0.0002)
    assert sys.getswitchinterval() == pytest.approx(0.001)  # the window still holds
    switch.enter(0.0002)
    switch.leave(0.001)
    assert sys.getswitchinterval() == pytest.approx(0.0002)
    switch.leave(0.0002)
    assert sys.getswitchinterval() == was


def test_a_fetch_that_cannot_register_fails_at_once_with_a_reason(s3_env, prefix, monkeypatch):
    """The scheduler's registration runs on the loop when the reads start; if it raises, the fetch
    fails (every page a miss, waiters released) instead of hanging until its deadline."""
    cfg = parse_config({"tiers": [s3_tier(s3_env, prefix)], "timeout": 30})
    c = ObjectCache(cfg, fingerprint("m"))
    try:
        src, ks = Pages(2, seed=22), keys(2)
        assert all(c.put(ks, src.segments()))

        def broken(*a, **kw):
            raise ValueError("no registration today")

        monkeypatch.setattr(c.tiers[0].scheduler, "register", broken)
        t = time.monotonic()
        f = c.fetch(ks, Pages.empty_like(src).segments())
        assert f.wait(30) == [False, False]
        assert time.monotonic() - t < 5
        assert "no registration today" in (f.readiness.failed or "")
    finally:
        c.close()


@pytest.mark.parametrize("native", ["off", "on"])
def test_table_targets_read_the_same_bytes(s3_env, prefix, native):
    """Targets given as an array (what the SGLang backend passes) are filled by numpy-built copy
    lists: the same bytes as the per-piece path, into pages in any order, over ranged reads."""
    src, ks, b = _written_then_reader(s3_env, prefix, seed=31, native=native)
    try:
        order = [2, 0, 3, 1]
        dst = Pages.empty_like(src)
        assert b.get([ks[i] for i in order], dst.segments(table=True)) == [True] * 4
        assert np.array_equal(dst.data, src.data[order])
        assert b.tiers[0].requests["get"] >= 1 + 3  # ranged: the manifest, then a range per layer block
    finally:
        b.close()


def test_a_cancelled_fetch_frees_its_grants_and_skips_reads_never_granted(s3_env, prefix):
    """Under a tight bandwidth cap most reads wait for a grant; at the deadline those are skipped
    without a request, the one on the network settles at once, and the next fetch of the same
    engine gets the link and reads every byte."""
    src, ks, b = _written_then_reader(s3_env, prefix, seed=33, native="auto", pages=8, bandwidth="64KiB",
                                      timeout=1)
    try:
        dst = Pages.empty_like(src)
        f = b.fetch(ks, dst.segments())
        t0 = time.monotonic()
        assert f.wait(0.5) == [False] * 8
        assert time.monotonic() - t0 < 2.0
        assert "deadline" in f.readiness.failed
        started = b.tiers[0].requests["get"]
        assert started < 1 + len(f.plan.reads), "reads never granted must not be sent"
        time.sleep(0.3)
        assert b.tiers[0].requests["get"] == started  # and are not sent later either
        dst2 = Pages.empty_like(src)  # now with time enough for 256 KiB at 64 KiB/s
        assert b.fetch(ks, dst2.segments(table=True)).wait(30) == [True] * 8
        assert np.array_equal(dst2.data, src.data)
    finally:
        b.close()


@pytest.mark.parametrize("cap", [None, "16KiB"], ids=["in-flight", "waiting-for-grants"])
def test_closing_during_a_fetch_ends_it_with_misses(s3_env, prefix, cap):
    """The engine closes while reads are in flight on the pull threads, or still wait for their
    grant under a cap: the fetch ends at once, not at its deadline, and reports misses or whole
    pages, never partial ones."""
    top = {"bandwidth": cap} if cap else {}
    src, ks, b = _written_then_reader(s3_env, prefix, seed=34, native="on", timeout=30, **top)
    _delay_reads(b.tiers[0], lambda start: 0.5)
    dst = Pages.empty_like(src)
    f = b.fetch(ks, dst.segments())
    time.sleep(0.1)
    t0 = time.monotonic()
    b.close()
    ok = f.wait(30)
    assert time.monotonic() - t0 < 10
    assert ok == [False] * 4 or ok == [True] * 4
    assert dst.only_verified_from(src)


@pytest.mark.parametrize("hold,streamed", [("0", True), ("5s", True), ("5s", False)],
                         ids=["no-hold", "hold", "hold-whole-fetch"])
def test_first_layer_hold_starts_later_ranges_once_layer_zero_is_in(s3_env, prefix, hold, streamed):
    """With `first_layer_hold`, the ranges of a streamed fetch that do not carry layer 0 start only
    once layer 0 has landed (counted piece by piece on the pull threads); without it, or for a
    fetch whose caller waits for the whole of it, they start at once."""
    src, ks, b = _written_then_reader(s3_env, prefix, seed=16, native="on", read_range_bytes="64KiB",
                                      first_layer_hold=hold)  # 2 layers a range: [0, 2) and [2, 4)
    assert all(b.get(ks, Pages.empty_like(src).segments()))  # its footer is held now: pieces stream in
    starts = []
    reader = b.tiers[0].range_reader.http
    orig = reader.read_pieces

    def logged(key, start, end, pieces, gate, layers=None):
        starts.append((time.monotonic(), start))
        if start == 0:
            time.sleep(0.3)  # the first range's server is slow
        return orig(key, start, end, pieces, gate, layers)
    reader.read_pieces = logged
    try:
        dst = Pages.empty_like(src)
        f = b.fetch(ks, dst.segments(table=True), streamed=streamed)
        assert all(f.wait(10)) and np.array_equal(dst.data, src.data)
        layer0 = f.readiness.ready_at[0]
        later = [t for t, start in starts if start > 0]
        assert later
        if hold == "0" or not streamed:
            assert min(later) < layer0, "without a hold the second range does not wait"
        else:
            assert min(later) >= layer0, "the second range started before layer 0 was in"
    finally:
        b.close()
