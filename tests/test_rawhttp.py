"""The native range reader (stores/rawhttp.py, native/httpget.c) against real servers: bytes,
signatures, errors as the store vocabulary, keep-alive, timeouts."""

from __future__ import annotations

import socket
import threading
import time

import boto3
import numpy as np
import pytest
from conftest import s3_tier

from sglang_objectcache import native
from sglang_objectcache.config import ConfigError, parse_config
from sglang_objectcache.stores.base import NotFound, StoreError, Unavailable
from sglang_objectcache.stores.credentials import Credentials
from sglang_objectcache.stores.rawhttp import RawRangeReader, StagingBuffers
from sglang_objectcache.stores.sigv4 import GetSigner

pytestmark = pytest.mark.skipif(native.http_get() is None, reason="native helper unavailable")


def reader(srv, secret=None, **kw) -> RawRangeReader:
    args = dict(endpoint=srv.endpoint, bucket=srv.bucket, region=srv.region,
                creds=Credentials(srv.access_key, secret or srv.secret_key), request_timeout=5,
                connect_timeout=2, max_idle=4)
    args.update(kw)
    return RawRangeReader(**args)


def reader_at(port: int, **kw) -> RawRangeReader:
    """A reader of a local port that is no S3 server, with half-second timeouts."""
    return RawRangeReader(**{"endpoint": f"http://127.0.0.1:{port}", "bucket": "kv-cache", "region": "us-east-1",
                             "creds": Credentials("a", "b"), "request_timeout": 0.5, "connect_timeout": 0.5,
                             "max_idle": 1, **kw})


@pytest.fixture
def obj(s3, prefix):
    """A 3 MiB object with a key that needs escaping; its name and bytes."""
    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    key = f"{prefix}/a b+c=d~e.bin"
    boto3.client("s3", **s3.client_kwargs()).put_object(Bucket=s3.bucket, Key=key, Body=data)
    return key, data


def test_signature_matches_botocore():
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config
    from botocore.credentials import Credentials as BotoCreds

    import calendar

    for token in (None, "tok/en+="):
        signer = GetSigner("127.0.0.1:8333", "eu-west-1", Credentials("AKID", "sekrit/+", token))
        path = signer.path("bucket", "p/x y+z~.bin")
        req = AWSRequest("GET", f"http://127.0.0.1:8333{path}",
                         headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
        req.context["client_config"] = Config(s3={"payload_signing_enabled": False})
        S3SigV4Auth(BotoCreds("AKID", "sekrit/+", token), "s3", "eu-west-1").add_auth(req)
        when = calendar.timegm(time.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
        ours = dict(signer.headers(path, now=when))  # signed at botocore's second
        assert ours["authorization"] == req.headers["Authorization"]
        assert ours.get("x-amz-security-token") == req.headers.get("X-Amz-Security-Token")


def test_ranges_come_back_exact_over_one_kept_connection(s3, obj):
    key, data = obj
    r = reader(s3)
    try:
        for start, end in ((0, 1), (5, 1 << 20), (1 << 20, 3 << 20), ((3 << 20) - 7, 3 << 20)):
            buf = bytearray(end - start)
            assert r.read_into(key, start, end, buf) == end - start
            assert bytes(buf) == data[start:end]
        assert len(r._idle) == 1, "one connection, kept alive and reused"
    finally:
        r.close()


def test_a_short_object_gives_fewer_bytes_not_an_error(s3, obj):
    key, data = obj
    r = reader(s3)
    try:
        buf = bytearray(100)
        assert r.read_into(key, len(data) - 40, len(data) + 60, buf) == 40  # the caller sees truncation
        assert bytes(buf[:40]) == data[-40:]
    finally:
        r.close()


def test_errors_are_the_store_vocabulary_without_secrets(s3, obj, prefix):
    key, _ = obj
    r, bad = reader(s3), reader(s3, secret="not-the-secret-XYZ")
    try:
        with pytest.raises(NotFound, match="NoSuchKey|404"):
            r.read_into(f"{prefix}/missing", 0, 10, bytearray(10))
        with pytest.raises(StoreError, match="403") as e:
            bad.read_into(key, 0, 10, bytearray(10))
        assert "not-the-secret-XYZ" not in str(e.value) and s3.secret_key not in str(e.value)
        other = reader(s3, bucket="no-such-bucket-oc", max_idle=1)
        with pytest.raises(NotFound):
            other.read_into(key, 0, 10, bytearray(10))
        r.read_into(key, 0, 10, bytearray(10))  # the reader still works after errors
    finally:
        r.close()
        bad.close()


def test_a_connection_the_server_closed_is_retried_on_a_new_one(s3, obj):
    key, data = obj
    r = reader(s3)
    try:
        buf = bytearray(10)
        r.read_into(key, 0, 10, buf)
        (idle,) = r._idle
        idle.shutdown(socket.SHUT_RDWR)  # as a server dropping an idle keep-alive connection
        r.read_into(key, 10, 20, buf)
        assert bytes(buf) == data[10:20]
    finally:
        r.close()


def test_unreachable_and_stalled_servers_are_unavailable_within_the_timeouts():
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = reader_at(port, max_retries=0)
    with pytest.raises(Unavailable, match="connect"):
        r.read_into("k", 0, 10, bytearray(10))
    # a server that accepts and never answers
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(4)
    held = []
    t = threading.Thread(target=lambda: held.append(lsn.accept()), daemon=True)
    t.start()
    r = reader_at(lsn.getsockname()[1])
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="timed out"):
        r.read_into("k", 0, 10, bytearray(10))
    assert time.monotonic() - t0 < 2.0, "a timeout is not retried"
    lsn.close()


def test_staging_buffers_are_reused_and_bounded(s3, obj):
    key, data = obj
    r, st = reader(s3), StagingBuffers(keep=2, min_bytes=1 << 20)
    try:
        with st.filled(r, key, 0, 4096) as a:
            assert bytes(a) == data[:4096]
            with st.filled(r, key, 4096, 8192) as b, st.filled(r, key, 0, 2 << 20) as c:
                assert bytes(b) == data[4096:8192] and bytes(c) == data[: 2 << 20]
        assert len(st._free) == 2  # three used at once, two kept
        with st.filled(r, key, 100, 200) as d:
            assert bytes(d) == data[100:200]
        assert len(st._free) == 2
    finally:
        r.close()


def test_native_reads_config():
    base = {"endpoint": "http://127.0.0.1:1", "bucket": "kv-cache"}
    assert parse_config({"tiers": [{"kind": "s3", **base}]}).tiers[0].native_reads == "auto"
    assert parse_config({"tiers": [{"kind": "s3", **base, "native_reads": False}]}).tiers[0].native_reads == "off"
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.native_reads: 'on' needs a plain http://"):
        parse_config({"tiers": [{"kind": "s3", "endpoint": "https://s3.example", "bucket": "kv-cache",
                                 "native_reads": "on"}]})
    with pytest.raises(ConfigError, match="native_reads: 'fast' is not one of"):
        parse_config({"tiers": [{"kind": "s3", **base, "native_reads": "fast"}]})


@pytest.mark.parametrize("native_reads", ["on", "off"])
def test_the_engine_reads_the_same_pages_either_way(s3_env, prefix, native_reads):
    from engine_util import Pages, fingerprint, keys

    from sglang_objectcache.engine.cache import ObjectCache

    cfg = parse_config({"tiers": [s3_tier(s3_env, prefix, native_reads=native_reads)],
                        "read_range_bytes": "64KiB", "first_range_layers": 1})
    c = ObjectCache(cfg, fingerprint("m"))
    try:
        assert (c.tiers[0].range_reader is not None) == (native_reads == "on")
        src, ks = Pages(12, seed=3), keys(12)
        assert all(c.put(ks, src.segments()))
        dst = Pages.empty_like(src)
        assert c.get(ks, dst.segments()) == [True] * 12
        assert np.array_equal(dst.data, src.data)
    finally:
        c.close()
