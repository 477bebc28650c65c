"""Shared fixtures: real S3 servers on 127.0.0.1 (SeaweedFS always; Ceph RGW where installed,
and always under CI), started once per session, and SGLang importable on CPU."""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # engine_util, and testbed (tests/testbed: S3 servers, CPU shims)
from testbed import cpu_shims  # noqa: E402

cpu_shims.install()

from testbed import servers  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def seaweedfs():
    srv = servers.start_seaweedfs()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def ceph():
    if not servers.ceph_available():
        if IN_CI:
            pytest.fail("Ceph RGW is not installed; .ci/install-ceph.sh installs it")
        pytest.skip("Ceph RGW not installed (bash .ci/install-ceph.sh)")
    srv = servers.start_ceph_rgw()
    yield srv
    srv.stop()


@pytest.fixture(params=["seaweedfs", "ceph"])
def s3(request):
    """Each real server in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The server's credentials in the standard AWS environment variables."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture
def prefix():
    """A fresh namespace prefix per test, so tests never see each other's objects."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def sglang_cpu():
    """SGLang's host-pool modules, patched to run without an accelerator."""
    import sglang.srt.mem_cache.memory_pool  # noqa: F401

    cpu_shims.install_cpu_hicache_patches()
    return True


def s3_tier(srv, prefix: str, **kw) -> dict:
    return {"kind": "s3", "endpoint": srv.endpoint, "bucket": srv.bucket, "prefix": prefix, **kw}


@pytest.fixture
def tmpdir_path():
    with tempfile.TemporaryDirectory() as d:
        yield d
