"""Write-back against real S3 servers: copies below the disk tier are bounded in memory, retried
while S3 is away, pushed back on the caller when too many are owed, drained at shutdown and
resumed after a restart; SIGTERM publishes what is owed before the process ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import s3_tier
from engine_util import Pages, fingerprint, keys
from test_index_truth import FAST, eventually

from sglang_objectcache.config import parse_config
from sglang_objectcache.engine import write_back as wb_mod
from sglang_objectcache.engine.cache import ObjectCache
from testbed.proxy import Proxy


def make(srv, prefix, disk, endpoint=None, **top) -> ObjectCache:
    t = s3_tier(srv, prefix, **FAST, request_timeout="1s", connect_timeout="500ms", max_retries=0)
    if endpoint:
        t["endpoint"] = endpoint
    cfg = {"tiers": [{"kind": "disk", "path": disk, "capacity": "1GiB"}, t], "write_policy": "write_back",
           "timeout": 5, **top}
    return ObjectCache(parse_config(cfg), fingerprint("m"))


def reader(srv, prefix) -> ObjectCache:
    return ObjectCache(parse_config({"tiers": [s3_tier(srv, prefix, **FAST)], "timeout": 5}), fingerprint("m"))


def in_s3(srv, prefix, spans) -> bool:
    r = reader(srv, prefix)
    try:
        for src, ks in spans:
            dst = Pages.empty_like(src)
            if r.get(ks, dst.segments()) != [True] * 8 or not np.array_equal(dst.data, src.data):
                return False
        return True
    finally:
        r.close()


def spans(n, tag):
    return [(Pages(8, seed=i), keys(8, f"{tag}{i}")) for i in range(n)]


def test_copies_wait_out_an_outage_in_bounded_memory_and_land(s3_env, prefix, tmpdir_path):
    proxy = Proxy(s3_env.port)
    one = 8 * 4 * 8192 + 4096
    c = make(s3_env, prefix, tmpdir_path, endpoint=proxy.endpoint, write_back_buffer=one)
    try:
        proxy.down()
        data = spans(4, "o")
        for src, ks in data:
            assert all(c.put(ks, src.segments())), "stored once the disk tier has them"
        wb = c.writer.write_back
        assert eventually(lambda: c.snapshot()["counters"].get("write_back_retries", 0) >= 1)
        assert wb.held <= one, "past the buffer, copies re-read the disk instead of holding bytes"
        assert wb.owed == 4
        proxy.up()
        assert eventually(lambda: wb.owed == 0, timeout=20), "retried until they land"
        assert c.snapshot()["counters"]["write_back_copied"] == 4
        c.flush()
        assert in_s3(s3_env, prefix, data)
    finally:
        c.close()
        proxy.close()


def test_too_many_owed_pushes_back_on_the_writer(s3_env, prefix, tmpdir_path, monkeypatch):
    monkeypatch.setattr(wb_mod, "MAX_QUEUED", 2)
    proxy = Proxy(s3_env.port)
    c = make(s3_env, prefix, tmpdir_path, endpoint=proxy.endpoint, timeout=1.5)
    try:
        proxy.down()
        data = spans(3, "b")
        for src, ks in data[:2]:
            assert all(c.put(ks, src.segments()))
        t0 = time.monotonic()
        assert c.put(data[2][1], data[2][0].segments()) == [False] * 8, "no room: not stored, not queued"
        assert 1.0 < time.monotonic() - t0 < 5.0, "it waited for room up to its deadline"
        assert c.exists(data[2][1]) == 0
        proxy.up()
        assert eventually(lambda: c.writer.write_back.owed == 0, timeout=20)
        assert all(c.put(data[2][1], data[2][0].segments())), "room again"
    finally:
        c.close()
        proxy.close()


def test_close_drains_what_is_owed(s3_env, prefix, tmpdir_path):
    c = make(s3_env, prefix, tmpdir_path)
    data = spans(3, "d")
    for src, ks in data:
        assert all(c.put(ks, src.segments()))
    c.close()  # at once: the copies and their manifest go out within shutdown_timeout
    assert in_s3(s3_env, prefix, data)


def test_what_a_shutdown_could_not_copy_is_copied_after_a_restart(s3_env, prefix, tmpdir_path):
    proxy = Proxy(s3_env.port)
    c = make(s3_env, prefix, tmpdir_path, endpoint=proxy.endpoint, shutdown_timeout="1s")
    data = spans(2, "r")
    try:
        proxy.down()
        for src, ks in data:
            assert all(c.put(ks, src.segments()))
        t0 = time.monotonic()
        c.close()
        assert time.monotonic() - t0 < 8, "close keeps to shutdown_timeout"
        assert c.snapshot()["counters"]["write_back_left_at_shutdown"] == 2
        proxy.up()
        again = make(s3_env, prefix, tmpdir_path, endpoint=proxy.endpoint)
        try:
            assert eventually(lambda: again.snapshot()["counters"].get("write_back_copied", 0) == 2, timeout=20)
            again.flush()
            assert in_s3(s3_env, prefix, data)
        finally:
            again.close()
    finally:
        proxy.close()


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from conftest import s3_tier
    from engine_util import Pages, fingerprint, keys
    from sglang_objectcache.config import parse_config
    from sglang_objectcache.engine.cache import ObjectCache
    from sglang_objectcache.sglang import shutdown
    from testbed.servers import S3Server
    import json
    srv = S3Server(**json.loads(sys.argv[2]))
    t = s3_tier(srv, sys.argv[3], manifest_flush_interval="60s")  # nothing published on its own
    cfg = parse_config({"tiers": [{"kind": "disk", "path": sys.argv[4], "capacity": "1GiB"}, t],
                        "write_policy": "write_back"})
    c = ObjectCache(cfg, fingerprint("m"))
    shutdown.register(c)
    for i in range(2):
        assert all(c.put(keys(8, f"t{i}"), Pages(8, seed=i).segments()))
    print("ready", flush=True)
    time.sleep(60)
""")


def test_sigterm_publishes_what_is_owed(s3_env, prefix, tmpdir_path):
    import dataclasses
    import json

    fields = {f.name: getattr(s3_env, f.name) for f in dataclasses.fields(s3_env) if not f.name.startswith("_")}
    p = subprocess.Popen([sys.executable, "-c", CHILD, os.path.dirname(__file__), json.dumps(fields), prefix,
                          tmpdir_path], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.dirname(__file__)])})
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        assert p.wait(40) == -signal.SIGTERM, "the process still ends by the signal"
    finally:
        if p.poll() is None:
            p.kill()
    assert in_s3(s3_env, prefix, spans(2, "t"))


def test_a_name_held_by_an_unusable_object_is_given_up_not_retried(s3_env, prefix, tmpdir_path, monkeypatch):
    """A writer with another integrity key stored the span first: that object can never be adopted,
    so the copy owed below the disk tier is dropped at once instead of retried for as long as the
    disk holds it."""
    monkeypatch.setenv("OC_TEST_KEY", "k" * 32)
    monkeypatch.setenv("OC_OTHER_KEY", "z" * 32)
    src, ks = Pages(8, seed=7), keys(8, "squat")
    squatter = ObjectCache(parse_config({"tiers": [s3_tier(s3_env, prefix, **FAST)], "timeout": 5,
                                         "integrity_key_env": "OC_OTHER_KEY"}), fingerprint("m"))
    try:
        assert squatter.put(ks, src.segments()) == [True] * 8
    finally:
        squatter.close()
    # it never announced its object (it crashed before its manifest): ours does not know the name
    import boto3

    s3 = boto3.client("s3", **s3_env.client_kwargs())
    for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"{prefix}/").get("Contents", []):
        if "/d/" not in o["Key"]:
            s3.delete_object(Bucket=s3_env.bucket, Key=o["Key"])
    c = make(s3_env, prefix, tmpdir_path, integrity_key_env="OC_TEST_KEY")
    try:
        assert c.put(ks, src.segments()) == [True] * 8  # on the disk tier: write_back's promise
        assert eventually(lambda: c.stats.snapshot().get("write_back_dropped", 0) == 1, 10), c.stats.snapshot()
        snap = c.stats.snapshot()
        assert snap.get("write_back_retries", 0) == 0 and snap.get("write_back_owed", 0) == 0, snap
    finally:
        c.close()
