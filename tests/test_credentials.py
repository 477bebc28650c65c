"""Credentials that change under a running backend: a key rotated in the shared credentials file
on a live Ceph RGW (the new key created, the old one deleted) is picked up by every data path
(obstore, aioboto3, the native reader's signer, NIXL's OBJ plugin) without a restart."""

from __future__ import annotations

import os
import subprocess
import uuid

import numpy as np
import pytest
from engine_util import Pages, fingerprint, keys

from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache
from sglang_objectcache.stores import nixl_reader
from sglang_objectcache.stores.credentials import CredentialSource
from testbed import servers


def admin(srv, *args) -> None:
    conf = os.path.join(srv.data_dir, "ceph.conf")
    subprocess.run(["radosgw-admin", "-c", conf, *args], check=True, capture_output=True,
                   env={**os.environ, "PATH": servers._ceph_path()})


def key_accepted(srv, key, secret, timeout: float = 15.0) -> None:
    """Wait until the gateway accepts a new key (RGW learns of it through its user cache, not at
    once), as a rotation would before it retires the old key."""
    import time

    import boto3
    from botocore.exceptions import ClientError

    kw = {**srv.client_kwargs(), "aws_access_key_id": key, "aws_secret_access_key": secret}
    deadline = time.monotonic() + timeout
    while True:
        try:
            boto3.client("s3", **kw).list_buckets()
            return
        except ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def write_credentials(path, key, secret) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    os.replace(tmp, path)  # as a rotation tool (or a mounted secret) swaps the file


@pytest.fixture
def rotating_user(s3_env, tmp_path, monkeypatch):
    """A user of its own on the Ceph RGW, with its keys in a shared credentials file the chain reads
    (the environment's keys, which would win, are taken away)."""
    if s3_env.kind != "ceph-rgw":
        pytest.skip("keys are rotated with radosgw-admin")
    uid = f"rot-{uuid.uuid4().hex[:8]}"
    k1, s1 = f"K1{uuid.uuid4().hex[:14]}".upper(), uuid.uuid4().hex
    admin(s3_env, "user", "create", f"--uid={uid}", "--display-name=rotation", f"--access-key={k1}",
          f"--secret-key={s1}")
    path = str(tmp_path / "credentials")
    write_credentials(path, k1, s1)
    for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", path)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return uid, path, (k1, s1)


@pytest.mark.parametrize("transport,native", [("obstore", "on"), ("aioboto3", "off"), ("nixl", "auto")])
def test_a_rotated_key_is_picked_up_without_a_restart(s3_env, rotating_user, transport, native):
    if transport == "nixl" and nixl_reader.available() is not None:
        pytest.skip(nixl_reader.available())
    uid, path, (k1, s1) = rotating_user
    tier = {"kind": "s3", "endpoint": s3_env.endpoint, "bucket": f"rot-{uuid.uuid4().hex[:8]}", "create_bucket": True,
            "transport": transport, "native_reads": native, "max_retries": 0,
            "index_refresh_interval": "200ms", "manifest_flush_interval": "100ms"}
    cfg = parse_config({"tiers": [tier], "timeout": 5})
    c = ObjectCache(cfg, fingerprint("m"))
    try:
        before = (Pages(8, seed=1), keys(8, "before"))
        assert all(c.put(before[1], before[0].segments()))
        k2, s2 = f"K2{uuid.uuid4().hex[:14]}".upper(), uuid.uuid4().hex
        admin(s3_env, "key", "create", f"--uid={uid}", "--key-type=s3", f"--access-key={k2}", f"--secret-key={s2}")
        key_accepted(s3_env, k2, s2)
        write_credentials(path, k2, s2)
        admin(s3_env, "key", "rm", f"--uid={uid}", "--key-type=s3", f"--access-key={k1}")
        # reads (the native reader's or the transport's), writes and the journal all go on
        dst = Pages.empty_like(before[0])
        assert c.get(before[1], dst.segments(table=True)) == [True] * 8
        assert np.array_equal(dst.data, before[0].data)
        after = (Pages(8, seed=2), keys(8, "after"))
        assert all(c.put(after[1], after[0].segments()))
        c.flush()
        assert c.snapshot()["counters"].get("errors", 0) == 0
        fresh = ObjectCache(cfg, fingerprint("m"))  # starts with the new key only
        try:
            dst = Pages.empty_like(after[0])
            assert fresh.get(after[1], dst.segments()) == [True] * 8
            assert np.array_equal(dst.data, after[0].data)
        finally:
            fresh.close()
    finally:
        c.close()


def test_the_source_follows_its_file(tmp_path, monkeypatch):
    path = str(tmp_path / "credentials")
    write_credentials(path, "AKIAFIRST", "s1")
    for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", path)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    src = CredentialSource()
    assert src.current().access_key_id == "AKIAFIRST"
    v = src.version
    write_credentials(path, "AKIASECOND", "s2")
    import time

    time.sleep(1.1)
    assert src.current().access_key_id == "AKIASECOND" and src.version == v + 1
    assert "s2" not in repr(src.current())
