"""`transport: nixl`: range reads through NIXL's OBJ plugin (nixl-cu12 1.5.1, CPU), against a real
SeaweedFS over http and https: round trips verified piece by piece, a missing object a miss that
heals the index, a truncated object a miss caught by the checksums, a dead server a miss within
the tier's request_timeout, and without nixl-cu12 the key names the install line."""

from __future__ import annotations

import time

import numpy as np
import pytest
from engine_util import Pages, fingerprint, keys

from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache
from sglang_objectcache.errors import ConfigError
from sglang_objectcache.stores import nixl_reader

pytestmark = pytest.mark.skipif(nixl_reader.available() is not None,
                                reason=f"nixl-cu12 not installed ({nixl_reader.INSTALL})")


def _cache(srv, prefix, **tier) -> ObjectCache:
    t = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix, "transport": "nixl",
         "max_connections": 4, "max_write_connections": 4, **tier}
    return ObjectCache(parse_config({"tiers": [t], "timeout": 10, "read_range_bytes": "128KiB"}), fingerprint("m"))


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_round_trip_through_nixl(s3_env, prefix):
    c = _cache(s3_env, prefix)
    try:
        from sglang_objectcache.stores.nixl_reader import NixlRangeReader

        assert isinstance(c.tiers[0].range_reader.http, NixlRangeReader)
        src, ks = Pages(16, seed=5), keys(16, "nixl")
        assert c.put(ks, src.segments()) == [True] * 16
        c.flush()
        fresh = _cache(s3_env, prefix)
        try:
            dst = Pages.empty_like(src)
            assert fresh.get(ks, dst.segments()) == [True] * 16
            assert np.array_equal(dst.data, src.data)
            assert fresh.tiers[0].requests.get("get", 0) >= 1
        finally:
            fresh.close()
    finally:
        c.close()


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_a_missing_object_is_a_miss_that_heals_and_a_truncated_one_is_caught(s3_env, prefix):
    import boto3

    c = _cache(s3_env, prefix)
    try:
        a, ka = Pages(8, seed=1), keys(8, "gone")
        b, kb = Pages(8, seed=2), keys(8, "cut")
        assert c.put(ka, a.segments()) == [True] * 8 and c.put(kb, b.segments()) == [True] * 8
        s3 = boto3.client("s3", **s3_env.client_kwargs())
        names = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"{prefix}/")["Contents"]
                 if "/d/" in o["Key"]}
        gone = next(k for k in names if ka[0] in k)
        cut = next(k for k in names if kb[0] in k)
        s3.delete_object(Bucket=s3_env.bucket, Key=gone)
        body = s3.get_object(Bucket=s3_env.bucket, Key=cut)["Body"].read()
        s3.put_object(Bucket=s3_env.bucket, Key=cut, Body=body[: len(body) // 2])
        c.tiers[0].headers.clear()  # as a fresh reader: footers come from the objects
        assert c.get(ka, Pages.empty_like(a).segments()) == [False] * 8
        assert c.exists(ka) == 0, "a missing object leaves the index"
        assert c.get(kb, Pages.empty_like(b).segments()) == [False] * 8
    finally:
        c.close()


def test_a_dead_server_is_a_miss_within_the_deadline(prefix, monkeypatch):
    from sglang_objectcache.stores.credentials import CredentialSource
    from sglang_objectcache.stores.nixl_reader import NixlRangeReader
    from testbed.servers import _pick_ports

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    r = NixlRangeReader(endpoint=f"http://127.0.0.1:{_pick_ports(1)[0]}", bucket="kv-cache", region="us-east-1",
                        credentials=CredentialSource(), request_timeout=2, max_retries=0, threads=2)
    t0 = time.monotonic()
    from sglang_objectcache.errors import StoreError

    with pytest.raises(StoreError):
        r.read_into("k", 0, 16, bytearray(16))
    assert time.monotonic() - t0 < 3


def test_without_nixl_the_key_names_the_install_line(monkeypatch):
    monkeypatch.setattr(nixl_reader, "available", lambda: "nixl-cu12 is not installed; " + nixl_reader.INSTALL)
    with pytest.raises(ConfigError, match=r"^tiers\[0\]\.transport: nixl: .*pip install --no-deps nixl-cu12==1\.5\.1"):
        parse_config({"tiers": [{"kind": "s3", "endpoint": "http://127.0.0.1:1", "bucket": "kv-cache",
                                 "transport": "nixl"}]})
