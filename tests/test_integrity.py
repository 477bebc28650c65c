"""Keyed integrity against real S3 servers: with a secret, an object written without it is a miss,
even one whose xxh3 sums are all correct; without the secret the same object is a hit. The secret
never appears in errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import s3_tier
from engine_util import Pages, fingerprint, keys

from sglang_objectcache.config import parse_config
from sglang_objectcache.engine.cache import ObjectCache
from sglang_objectcache.errors import StartupError

SECRET = "f3b1c0a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9"


def make(srv, prefix, tmp_path, secret: str | None = SECRET) -> ObjectCache:
    top = {}
    if secret is not None:
        path = tmp_path / "integrity.key"
        path.write_text(secret + "\n")
        top["integrity_key_file"] = str(path)
    cfg = {"tiers": [s3_tier(srv, prefix, index_refresh_interval="200ms", manifest_flush_interval="100ms")],
           "timeout": 5, **top}
    return ObjectCache(parse_config(cfg), fingerprint("m"))


def without_key(cache: ObjectCache) -> ObjectCache:
    """The same namespace, used by someone who lacks the secret: writes carry no MAC, reads check none."""
    cache.writer.mac_key = None
    cache._reads.mac_key = None
    for t in cache.tiers:
        t.mac_key = None
    return cache


def test_keyed_round_trip_and_its_own_namespace(s3_env, prefix, tmp_path):
    a = make(s3_env, prefix, tmp_path)
    plain = make(s3_env, prefix, tmp_path, secret=None)
    try:
        src, ks = Pages(8, seed=1), keys(8)
        assert all(a.put(ks, src.segments()))
        dst = Pages.empty_like(src)
        assert a.get(ks, dst.segments()) == [True] * 8 and np.array_equal(dst.data, src.data)
        assert a.ns.root != plain.ns.root and plain.exists(ks) == 0
    finally:
        a.close()
        plain.close()


def test_a_forged_object_with_correct_sums_is_a_miss_with_the_key_and_a_hit_without(s3_env, prefix, tmp_path):
    forger = without_key(make(s3_env, prefix, tmp_path))  # can write to the bucket, has no secret
    reader = make(s3_env, prefix, tmp_path)
    blind = without_key(make(s3_env, prefix, tmp_path))
    try:
        src, ks = Pages(8, seed=2), keys(8, "forged")
        assert all(forger.put(ks, src.segments()))  # valid xxh3 sums, announced in a manifest
        forger.flush()
        for c in (reader, blind):
            c.runtime.run(c.tiers[0].journal.refresh(), timeout=10)
        dst = Pages.empty_like(src)
        assert reader.get(ks, dst.segments()) == [False] * 8 and not dst.data.any()
        assert reader.snapshot()["counters"]["corrupt"] == 1
        assert blind.get(ks, dst.segments()) == [True] * 8, "the checksums alone accept it"
        # and the keyed writer does not adopt the forgery when it writes the same pages
        assert reader.put(ks, src.segments()) == [False] * 8
    finally:
        for c in (forger, reader, blind):
            c.close()


def test_the_secret_is_checked_at_start_and_never_shown(s3_env, prefix, tmp_path, monkeypatch):
    cfg = {"tiers": [s3_tier(s3_env, prefix)], "integrity_key_file": str(tmp_path / "missing.key")}
    with pytest.raises(StartupError, match="integrity_key_file"):
        ObjectCache(parse_config(cfg), fingerprint("m"))
    monkeypatch.setenv("OC_TEST_SECRET", "short-secret")
    cfg = {"tiers": [s3_tier(s3_env, prefix)], "integrity_key_env": "OC_TEST_SECRET"}
    with pytest.raises(StartupError, match="shorter than 16 bytes") as e:
        ObjectCache(parse_config(cfg), fingerprint("m"))
    assert "short-secret" not in str(e.value)
    c = make(s3_env, prefix, tmp_path)
    try:
        assert SECRET not in repr(c.cfg) and SECRET not in str(c.snapshot())
    finally:
        c.close()
