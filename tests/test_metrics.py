"""The engine's counters reach SGLang's Prometheus endpoint: with `--enable-metrics` SGLang's
processes share a prometheus_client multiprocess directory, and its `/metrics` reads what each
process wrote there. A child process plays the scheduler process (the backend writes pages), then
the directory is read the way SGLang's HTTP server reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from testbed import cpu_shims
    cpu_shims.install()
    import sglang.srt.mem_cache.memory_pool
    cpu_shims.install_cpu_hicache_patches()
    from testbed.sglang_pools import fill_random, make_host_pool, storage_config
    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    pool = make_host_pool("mha", "layer_first")
    cfg = storage_config(mla=False, layout="layer_first",
                         extra={{"tiers": [{{"kind": "disk", "path": {disk!r}, "capacity": "1GiB"}}]}})
    b = ObjectCacheStorage(cfg, pool)
    idx = torch.arange(0, 4 * 16)
    fill_random(pool, seed=3)
    assert all(b.batch_set_v1([f"k{{i}}" for i in range(4)], idx))
    b.close()
""")


def _samples(mp_dir: str) -> dict:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=mp_dir)
    out = {}
    for fam in reg.collect():
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "pid"}
            out[(s.name, json.dumps(labels, sort_keys=True))] = s.value
    return out


@pytest.mark.usefixtures("sglang_cpu")
def test_counters_reach_the_multiprocess_directory(tmp_path):
    pytest.importorskip("prometheus_client")
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp_dir))
    code = CHILD.format(tests=TESTS, disk=str(tmp_path / "disk"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _samples(str(mp_dir))
    rank = json.dumps({"rank": "tp0pp0"})
    assert got[("objectcache_put_pages", rank)] == 4
    assert got[("objectcache_put_written", rank)] == 4
    tier = next(json.loads(k[1])["tier"] for k in got if k[0] == "objectcache_tier_used_bytes")
    assert tier.startswith("disk:")
    assert got[("objectcache_tier_used_bytes", json.dumps({"rank": "tp0pp0", "tier": tier}, sort_keys=True))] > 0
    assert got[("objectcache_tier_requests",
                json.dumps({"rank": "tp0pp0", "tier": tier, "verb": "put"}, sort_keys=True))] >= 1


def test_without_metrics_nothing_is_started(monkeypatch):
    from sglang_objectcache.sglang import metrics

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(metrics, "metrics_enabled", lambda: False)
    assert metrics.start_exporter(lambda: {"counters": {"x": 1}}, "tp0pp0") is None


def test_a_backend_attached_again_keeps_exporting(monkeypatch):
    """SGLang re-attaches a storage backend at runtime (`PUT /hicache/storage-backend`): the second
    backend's exporter must not be refused for names the first one registered."""
    pytest.importorskip("prometheus_client")
    from sglang_objectcache.sglang import metrics

    monkeypatch.setattr(metrics, "metrics_enabled", lambda: True)
    snap = {"counters": {"reattach_test_pages": 3}, "tiers": {"disk:/x": {"used_bytes": 5, "requests": {"put": 1}}}}
    first = metrics.start_exporter(lambda: snap, "tp0pp0")
    assert first is not None
    first.stop()
    second = metrics.start_exporter(lambda: snap, "tp0pp0")
    assert second is not None, "the second exporter was refused"
    second.stop()


def test_the_linker_routes_counts_are_exported(monkeypatch):
    pytest.importorskip("prometheus_client")
    from prometheus_client import REGISTRY

    from sglang_objectcache.sglang import metrics

    monkeypatch.setattr(metrics, "metrics_enabled", lambda: True)
    ex = metrics.start_exporter(lambda: {"counters": {}, "linker": {"load_pages": 7, "failed_batches": 1}},
                                "tp9pp0")
    assert ex is not None
    try:
        ex.update()
        assert REGISTRY.get_sample_value("objectcache_linker_load_pages", {"rank": "tp9pp0"}) == 7
        assert REGISTRY.get_sample_value("objectcache_linker_failed_batches", {"rank": "tp9pp0"}) == 1
    finally:
        ex.stop()
