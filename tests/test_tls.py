"""https endpoints: a real SeaweedFS serving S3 over TLS on loopback, with a certificate from a CA
this test makes (`ca_bundle`). Reads go through the native reader built against the system's
OpenSSL; control operations through obstore or aioboto3, all verifying the server's certificate."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from engine_util import Pages, fingerprint, keys

from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache
from sglang_objectcache.errors import ConfigError, StartupError, StoreError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module", autouse=True)
def native_tls():
    """The native https reader must build in CI (.ci/install-ceph.sh installs libssl-dev)."""
    from conftest import IN_CI

    from sglang_objectcache import native

    if native.tls() is None:
        if IN_CI:
            pytest.fail(f"the native https reader does not build: {native.tls_status()}")
        pytest.skip(f"the native https reader does not build here: {native.tls_status()}")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """SeaweedFS seen through its https port; the CA that signed its certificate; another CA."""
    from testbed.tls import start_seaweedfs_tls

    srv, srv_tls, certs = start_seaweedfs_tls(tmp_path_factory.mktemp("tls"))
    yield srv_tls, certs["ca"], certs["other_ca"]
    srv.stop()


def _cfg(srv, prefix, ca, **tier):
    t = {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix, "ca_bundle": ca,
         "native_reads": "on", **tier}
    return parse_config({"tiers": [t], "timeout": 10})


@pytest.mark.parametrize("transport", ["obstore", "aioboto3", "nixl"])
def test_round_trip_over_https_with_a_private_ca(tls_server, prefix, monkeypatch, transport):
    from sglang_objectcache.stores import nixl_reader

    if transport == "nixl" and nixl_reader.available():
        pytest.skip(nixl_reader.available())
    srv, ca, _ = tls_server
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    c = ObjectCache(_cfg(srv, prefix, ca, transport=transport), fingerprint("m"))
    try:
        tier = c.tiers[0]
        assert tier.range_reader is not None, "https reads go through the native reader"
        src, ks = Pages(16, seed=3), keys(16, "tls")
        assert c.put(ks, src.segments()) == [True] * 16
        c.flush()  # its manifest: what a fresh instance learns the objects from
        fresh = ObjectCache(_cfg(srv, prefix, ca, transport=transport), fingerprint("m"))
        try:
            dst = Pages.empty_like(src)
            assert fresh.get(ks, dst.segments()) == [True] * 16
            assert np.array_equal(dst.data, src.data)
            assert fresh.tiers[0].range_reader is not None
        finally:
            fresh.close()
    finally:
        c.close()


def test_a_wrong_ca_is_a_clear_startup_error(tls_server, prefix, monkeypatch):
    srv, _, other_ca = tls_server
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StartupError, match=r"^tiers\[0\]\.endpoint: https://127\.0\.0\.1:\d+: TLS certificate verify "
                       r"failed: .*; set ca_bundle to the CA that signed"):
        ObjectCache(_cfg(srv, prefix, other_ca), fingerprint("m"))


def test_without_the_ca_the_system_store_refuses_a_private_one(tls_server, prefix, monkeypatch):
    """No ca_bundle: the system's CAs, which never signed this server: refused, never unverified."""
    srv, _, _ = tls_server
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(StartupError, match="TLS certificate verify failed"):
        ObjectCache(_cfg(srv, prefix, None), fingerprint("m"))


def test_the_native_reader_verifies_the_peer_itself(tls_server):
    """The native https reader alone (what reads use): the right CA connects, another CA is refused
    with the reason, and a host name the certificate does not carry is refused."""
    from sglang_objectcache.stores.credentials import CredentialSource
    from sglang_objectcache.stores.rawhttp import RawRangeReader

    srv, ca, other_ca = tls_server

    def reader(endpoint, bundle):
        return RawRangeReader(endpoint=endpoint, bucket=srv.bucket, region=srv.region, creds=CredentialSource(None),
                              request_timeout=5, connect_timeout=2, max_idle=2, ca_bundle=bundle)
    r = reader(srv.endpoint, ca)
    try:
        r.check()
    finally:
        r.close()
    r = reader(srv.endpoint, other_ca)
    try:
        with pytest.raises(StoreError, match="certificate verify failed"):
            r.check()
    finally:
        r.close()
    port = srv.endpoint.rsplit(":", 1)[1]
    r = reader(f"https://127.0.0.2:{port}", ca)  # not in the certificate (nothing listens there either)
    try:
        with pytest.raises(StoreError):
            r.check()
    finally:
        r.close()


def test_a_missing_ca_bundle_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^tiers\[0\]\.ca_bundle: cannot read"):
        parse_config({"tiers": [{"kind": "s3", "bucket": "kv-cache", "ca_bundle": str(tmp_path / "none.pem")}]})
    (tmp_path / "x.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"^tiers\[0\]\.ca_bundle: .* holds no PEM certificate"):
        parse_config({"tiers": [{"kind": "s3", "bucket": "kv-cache", "ca_bundle": str(tmp_path / "x.pem")}]})


def test_a_dead_https_server_is_a_miss_within_the_deadline(tls_server):
    from sglang_objectcache.errors import Unavailable
    from sglang_objectcache.stores.credentials import CredentialSource
    from sglang_objectcache.stores.rawhttp import RawRangeReader
    from testbed.servers import _pick_ports

    srv, ca, _ = tls_server
    r = RawRangeReader(endpoint=f"https://127.0.0.1:{_pick_ports(1)[0]}", bucket=srv.bucket, region=srv.region,
                       creds=CredentialSource(None), request_timeout=2, connect_timeout=1, max_idle=2,
                       max_retries=0, ca_bundle=ca)
    t0 = time.monotonic()
    try:
        with pytest.raises(Unavailable):
            r.read_into("k", 0, 16, bytearray(16))
    finally:
        r.close()
    assert time.monotonic() - t0 < 3


def test_create_bucket_over_https_trusts_the_ca_bundle(tls_server, prefix, monkeypatch):
    import uuid

    srv, ca, _ = tls_server
    for k, v in srv.env().items():
        monkeypatch.setenv(k, v)
    cfg = parse_config({"tiers": [{"kind": "s3", "endpoint": srv.endpoint, "bucket": f"tls-{uuid.uuid4().hex[:8]}",
                                   "prefix": prefix, "ca_bundle": ca, "create_bucket": True}], "timeout": 10})
    c = ObjectCache(cfg, fingerprint("m"))  # the bucket is made over TLS, verified with the CA
    c.close()
