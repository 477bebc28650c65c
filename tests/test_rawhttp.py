"""The native range reader (stores/rawhttp.py, native/httpget.c) against real servers: bytes,
signatures, errors as the store vocabulary, keep-alive, timeouts."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import boto3
import numpy as np
import pytest
import xxhash
from conftest import s3_tier

from sglang_objectcache import native
from sglang_objectcache.config import ConfigError, parse_config
from sglang_objectcache.stores.base import (APPLIED, CLOSED, SHORT, NotFound, RangePieces, RangeReader, StoreError,
                                            Unavailable)
from sglang_objectcache.stores.credentials import Credentials
from sglang_objectcache.stores.native_reader import StagingBuffers
from sglang_objectcache.stores.rawhttp import RawRangeReader
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
        idle.sock.shutdown(socket.SHUT_RDWR)  # as a server dropping an idle keep-alive connection
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


@pytest.mark.parametrize("way", ["whole", "pieces"])
def test_a_server_that_trickles_bytes_times_out_within_the_request_timeout(way):
    """request_timeout bounds the whole request, not each wait: a server that sends a byte every
    20 ms (each wait short) still fails the read after about request_timeout, without a retry."""
    body = bytes(64 << 10)
    stop = threading.Event()

    def trickle(conn):
        for i in range(len(body)):
            if stop.wait(0.02):
                break
            conn.sendall(body[i:i + 1])
    try:
        with range_server(body, trickle) as port:
            r = reader_at(port, request_timeout=0.5)
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match="timed out"):
                if way == "whole":
                    r.read_into("k", 0, len(body), bytearray(len(body)))
                else:
                    target = np.zeros(len(body), dtype=np.uint8)  # one piece, the whole body
                    one = RangePieces(np.zeros(1, dtype=np.uint64), len(body), None,
                                      np.array([[target.ctypes.data, 0, len(body)]], dtype=np.uint64),
                                      np.array([0, 1], dtype=np.int64))
                    r.read_pieces("k", 0, len(body), one, native.CopyGate())
            assert time.monotonic() - t0 < 1.5, "the deadline is the request's, not each wait's"
    finally:
        stop.set()


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


PIECE = 96 << 10


def pieces_of(body: bytes, offsets, check=True):
    """RangePieces for the pieces of `body` (a range's bytes) at `offsets`, each copied in two
    halves to reversed places in a zeroed target; the target and the bytes it should end with."""
    n, half = len(offsets), PIECE // 2
    target = np.zeros(n * PIECE, dtype=np.uint8)
    want = np.zeros_like(target)
    copies = []
    for i, off in enumerate(offsets):
        at = (n - 1 - i) * PIECE
        copies += [(target.ctypes.data + at + half, off, half), (target.ctypes.data + at, off + half, half)]
        want[at + half:at + PIECE] = np.frombuffer(body[off:off + half], dtype=np.uint8)
        want[at:at + half] = np.frombuffer(body[off + half:off + PIECE], dtype=np.uint8)
    expect = np.array([xxhash.xxh3_64_intdigest(body[o:o + PIECE]) for o in offsets], dtype=np.uint64)
    p = RangePieces(np.array(offsets, dtype=np.uint64), PIECE, expect if check else None,
                    np.array(copies, dtype=np.uint64), np.arange(0, 2 * n + 1, 2, dtype=np.int64))
    return p, target, want


@pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])
def test_pieces_go_straight_to_their_targets_and_the_rest_is_dropped(s3, obj, check):
    """A range read piece by piece: pieces with gaps between them, and bytes after the last, go
    where their copies say; the body is read to its end, so the connection is kept."""
    key, data = obj
    start, end = 1000, 1000 + 12 * PIECE + 77
    p, target, want = pieces_of(data[start:end], [0, 3 * PIECE + 5, 4 * PIECE + 5, 11 * PIECE], check)
    r = reader(s3)
    try:
        assert r.read_pieces(key, start, end, p, native.CopyGate()) == APPLIED
        assert np.array_equal(target, want)
        assert len(r._idle) == 1, "the body was read to its end: the connection is kept"
        buf = bytearray(10)
        r.read_into(key, 0, 10, buf)
        assert bytes(buf) == data[:10] and len(r._idle) == 1
    finally:
        r.close()


def test_a_bad_piece_stops_the_copies_there_and_short_or_closed_reads_copy_nothing(s3, obj):
    key, data = obj
    start, end = 0, 6 * PIECE
    r = reader(s3)
    try:
        p, target, want = pieces_of(data[start:end], [0, PIECE, 2 * PIECE, 5 * PIECE])
        p.expect[2] ^= 1
        assert r.read_pieces(key, start, end, p, native.CopyGate()) == 2
        n = 4
        done = slice((n - 2) * PIECE, n * PIECE)  # pieces 0 and 1 (copied to reversed places)
        assert np.array_equal(target[done], want[done]), "checked pieces before the bad one are in place"
        assert not target[: (n - 2) * PIECE].any(), "neither the bad piece nor any after it is copied"
        # a range past the object's end: the body is short, nothing is copied
        tail = len(data) - 2 * PIECE
        p, target, _ = pieces_of(data[tail:] + bytes(PIECE), [0, 2 * PIECE])
        assert r.read_pieces(key, tail, tail + 3 * PIECE, p, native.CopyGate()) == SHORT
        assert not target.any()
        # a closed gate: the bytes come, none goes in
        p, target, _ = pieces_of(data[:2 * PIECE], [0, PIECE])
        gate = native.CopyGate()
        gate.close()
        assert r.read_pieces(key, 0, 2 * PIECE, p, gate) == CLOSED
        assert not target.any()
        p, target, want = pieces_of(data[:2 * PIECE], [0, PIECE])  # and the reader goes on
        assert r.read_pieces(key, 0, 2 * PIECE, p, native.CopyGate()) == APPLIED
        assert np.array_equal(target, want)
    finally:
        r.close()


@contextlib.contextmanager
def range_server(body: bytes, feed):
    """A local server that answers one range GET with a 206 header for `body`, then lets
    `feed(conn)` send the body as the test wants; yields its port."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)

    def serve():
        conn, _ = lsn.accept()
        conn.recv(65536)
        try:
            conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nContent-Range: bytes 0-%d/%d\r\n\r\n"
                         % (len(body), len(body) - 1, len(body)))
            feed(conn)
        except OSError:  # the reader gave up and closed
            pass
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield lsn.getsockname()[1]
    finally:
        lsn.close()


@contextlib.contextmanager
def stalled_server(body: bytes, sent: int):
    """A local server that answers one range GET with `body`, sends its first `sent` bytes, then
    stalls until the event it yields is set."""
    go = threading.Event()

    def feed(conn):
        conn.sendall(body[:sent])
        go.wait(10)
        conn.sendall(body[sent:])
        time.sleep(0.5)
    try:
        with range_server(body, feed) as port:
            yield port, go
    finally:
        go.set()


def wait_until(cond, seconds=5.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


GAP = 4096  # between two pieces: adjacent pieces are received together, up to BOUNCE_BYTES


def test_closing_the_gate_during_a_stalled_body_returns_at_once_and_nothing_more_lands():
    """A server that sends the first piece, then stalls: closing the gate does not wait for the
    network (only for copies running), and the bytes that come later never reach their targets."""
    body = np.random.default_rng(7).integers(0, 256, 2 * PIECE + GAP, dtype=np.uint8).tobytes()
    p, target, want = pieces_of(body, [0, PIECE + GAP])
    gate, out = native.CopyGate(), []
    with stalled_server(body, PIECE) as (port, go):
        r = reader_at(port, request_timeout=10)
        t = threading.Thread(target=lambda: out.append(r.read_pieces("k", 0, len(body), p, gate)))
        t.start()
        wait_until(lambda: target[PIECE:].any())  # piece 0 lands (last place)
        assert np.array_equal(target[PIECE:], want[PIECE:])
        t0 = time.monotonic()
        gate.close()
        assert time.monotonic() - t0 < 0.5, "closing waits for copies, not for the network"
        assert t.is_alive(), "the read is still waiting for its second piece"
        go.set()
        t.join(10)
    assert out == [CLOSED]
    assert not target[:PIECE].any(), "the piece that came after the close is not copied"


def test_each_layer_of_a_range_is_ready_as_soon_as_its_pieces_are_in_place():
    """One range of two layers (a piece each): layer 0 counts as arrived, and its waiter wakes,
    while layer 1 is still on the wire; then layer 1 lands too."""
    from sglang_objectcache.engine.readiness import LayerReadiness

    body = np.random.default_rng(8).integers(0, 256, 2 * PIECE + GAP, dtype=np.uint8).tobytes()
    p, target, want = pieces_of(body, [0, PIECE + GAP])
    p.l0, p.per_layer = 0, 1
    layers, out = LayerReadiness(2, [1, 1]), []
    with stalled_server(body, PIECE) as (port, go):
        r = reader_at(port, request_timeout=10)
        t = threading.Thread(target=lambda: out.append(r.read_pieces("k", 0, len(body), p, native.CopyGate(),
                                                                     layers)))
        t.start()
        assert layers.wait(0, 5), "layer 0 is ready before the range has ended"
        assert np.array_equal(target[PIECE:], want[PIECE:])
        assert t.is_alive() and not layers.is_ready(1) and layers.ready_layers == 1
        go.set()
        assert layers.wait(1, 5)
        t.join(10)
    assert out == [APPLIED] and np.array_equal(target, want)
    assert layers.ready_layers == 2 and layers.ready_at[0] <= layers.ready_at[1]


def test_native_reads_config():
    base = {"endpoint": "http://127.0.0.1:1", "bucket": "kv-cache"}
    assert parse_config({"tiers": [{"kind": "s3", **base}]}).tiers[0].native_reads == "auto"
    assert parse_config({"tiers": [{"kind": "s3", **base, "native_reads": False}]}).tiers[0].native_reads == "off"
    assert parse_config({"tiers": [{"kind": "s3", "endpoint": "https://s3.example", "bucket": "kv-cache",
                                    "native_reads": "on"}]}).tiers[0].native_reads == "on"  # TLS: tls.c
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.native_reads: 'on' needs an endpoint"):
        parse_config({"tiers": [{"kind": "s3", "bucket": "kv-cache", "native_reads": "on"}]})
    with pytest.raises(ConfigError, match="native_reads: 'fast' is not one of"):
        parse_config({"tiers": [{"kind": "s3", **base, "native_reads": "fast"}]})


@pytest.mark.parametrize("native_reads,table", [("on", True), ("on", False), ("off", True)])
def test_the_engine_reads_the_same_pages_either_way(s3_env, prefix, native_reads, table):
    from engine_util import Pages, fingerprint, keys

    from sglang_objectcache.engine.cache import ObjectCache

    cfg = parse_config({"tiers": [s3_tier(s3_env, prefix, native_reads=native_reads)],
                        "read_range_bytes": "64KiB"})
    c = ObjectCache(cfg, fingerprint("m"))
    try:
        assert (c.tiers[0].range_reader is not None) == (native_reads == "on")
        src, ks = Pages(12, seed=3), keys(12)
        assert all(c.put(ks, src.segments()))
        dst = Pages.empty_like(src)
        assert c.get(ks, dst.segments(table=table)) == [True] * 12
        assert np.array_equal(dst.data, src.data)
        if native_reads == "on":  # piece by piece exactly where it can be: a table of targets
            assert isinstance(c.tiers[0].range_reader, RangeReader)
            assert bool(c.tiers[0].range_reader.staging._free) == (not table)
    finally:
        c.close()
