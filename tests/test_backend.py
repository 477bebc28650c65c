"""ObjectCacheStorage through SGLang's real host pools (MHA, MLA; each supported layout)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import s3_tier

from sglang_objectcache.config import ConfigError

pytestmark = pytest.mark.usefixtures("sglang_cpu")

LAYOUTS = ["layer_first", "page_first_direct"]


def backend(pool, extra, *, mla, layout, **kw):
    from testbed.sglang_pools import storage_config

    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    return ObjectCacheStorage(storage_config(mla=mla, layout=layout, extra=extra, **kw), pool)


def indices(first_page: int, n_pages: int, page: int = 16) -> torch.Tensor:
    return torch.arange(first_page * page, (first_page + n_pages) * page, dtype=torch.int64)


def hkeys(n: int, salt: str = "") -> list[str]:
    from engine_util import keys

    return keys(n, salt)


@pytest.mark.parametrize("attention", ["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_v1_round_trip_bytes_equal(s3_env, prefix, attention, layout):
    from testbed.sglang_pools import fill_random, make_host_pool, page_bytes

    mla = attention == "mla"
    src_pool = make_host_pool(attention, layout)
    fill_random(src_pool, seed=1)
    dst_pool = make_host_pool(attention, layout)
    extra = {"tiers": [s3_tier(s3_env, prefix)], "pages_per_object": 3, "prefetch_threshold": 256,
             "interface_v1": 1}
    a = backend(src_pool, extra, mla=mla, layout=layout)
    b = backend(dst_pool, extra, mla=mla, layout=layout)
    try:
        ks = hkeys(5)
        src_idx, dst_idx = indices(2, 5), indices(9, 5)
        assert a.batch_set_v1(ks, src_idx) == [True] * 5
        a.cache.flush()
        assert a.batch_exists(ks) == 5
        b.cache.runtime.run(b.cache.tiers[0].journal.refresh(), timeout=10)
        assert b.batch_exists(ks) == 5
        assert b.batch_get_v1(ks, dst_idx) == [True] * 5
        assert page_bytes(dst_pool, dst_idx) == page_bytes(src_pool, src_idx)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_layer_first_and_page_first_direct_write_the_same_objects(tmpdir_path, attention):
    """Objects are layer-major whatever the host layout, so one layout reads the other's pages."""
    from testbed.sglang_pools import fill_random, make_host_pool, page_bytes

    mla = attention == "mla"
    extra = {"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]}
    src_pool = make_host_pool(attention, "layer_first")
    fill_random(src_pool, seed=2)
    a = backend(src_pool, extra, mla=mla, layout="layer_first")
    ks = hkeys(4)
    assert all(a.batch_set_v1(ks, indices(1, 4)))
    a.close()
    dst_pool = make_host_pool(attention, "page_first_direct")
    b = backend(dst_pool, extra, mla=mla, layout="page_first_direct")
    try:
        assert b.batch_exists(ks) == 4
        assert all(b.batch_get_v1(ks, indices(6, 4)))
        assert page_bytes(dst_pool, indices(6, 4)) == page_bytes(src_pool, indices(1, 4))
    finally:
        b.close()


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_generic_interface_matches_v1(tmpdir_path, attention):
    from testbed.sglang_pools import fill_random, make_host_pool, page_bytes

    mla = attention == "mla"
    pool = make_host_pool(attention, "layer_first")
    fill_random(pool, seed=3)
    b = backend(pool, {"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]},
                mla=mla, layout="layer_first")
    try:
        ks = hkeys(3)
        ref = page_bytes(pool, indices(0, 3))
        # generic set of flat pages, then zero-copy get into other slots
        flats = [pool.get_data_page(i, flat=True).contiguous() for i in indices(0, 3)[::16]]
        assert b.batch_set(ks, flats)
        assert all(b.batch_get_v1(ks, indices(10, 3)))
        assert page_bytes(pool, indices(10, 3)) == ref
        # zero-copy set, then generic get into SGLang's own dummy flat pages
        ks2 = hkeys(3, "v1")
        assert all(b.batch_set_v1(ks2, indices(0, 3)))
        got = b.batch_get(ks2)
        assert [t.contiguous().view(torch.uint8).numpy().tobytes() for t in got] == ref
        assert b.exists(ks2[0]) and not b.exists("0" * 64)
        assert b.get("f" * 64) is None
    finally:
        b.close()


def test_page_first_is_refused_with_the_fix(tmpdir_path):
    from testbed.sglang_pools import make_host_pool

    pool = make_host_pool("mha", "page_first")
    with pytest.raises(ConfigError, match="page_first is not supported.*--hicache-mem-layout layer_first"):
        backend(pool, {"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]},
                mla=False, layout="page_first")


def test_unknown_key_is_refused_and_sglang_keys_pass(tmpdir_path):
    from testbed.sglang_pools import make_host_pool

    pool = make_host_pool("mha", "layer_first")
    disk = {"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}
    with pytest.raises(ConfigError, match="pages_per_objekt: unknown key"):
        backend(pool, {"tiers": [disk], "pages_per_objekt": 4}, mla=False, layout="layer_first")
    ok = backend(pool, {"tiers": [disk], "prefetch_threshold": 512, "backend_name": "objectcache",
                        "module_path": "x", "class_name": "y", "interface_v1": 1,
                        "hicache_storage_pass_prefix_keys": True}, mla=False, layout="layer_first")
    ok.close()


@pytest.mark.parametrize("change", ["model", "tp", "dtype", "layers"])
def test_pages_of_another_model_dtype_or_split_never_load(tmpdir_path, change):
    from testbed.sglang_pools import fill_random, make_host_pool

    disk = {"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]}
    src = make_host_pool("mha", "layer_first")
    fill_random(src, seed=4)
    a = backend(src, disk, mla=False, layout="layer_first")
    ks = hkeys(2)
    assert all(a.batch_set_v1(ks, indices(0, 2)))
    a.close()
    kw, pool_kw = {}, {}
    if change == "model":
        kw["model"] = "another-model"
    elif change == "tp":
        kw.update(tp_rank=1, tp_size=2)
    elif change == "dtype":
        pool_kw["dtype"] = torch.float16
    else:
        pool_kw["layers"] = 5
    dst = make_host_pool("mha", "layer_first", **pool_kw)
    b = backend(dst, disk, mla=False, layout="layer_first", **kw)
    try:
        assert b.batch_exists(ks) == 0
        assert b.batch_get_v1(ks, indices(0, 2)) == [False, False]
        assert not dst.kv_buffer.view(torch.uint8).any()
    finally:
        b.close()


def test_get_stats_returns_sglang_storage_metrics(tmpdir_path):
    from sglang.srt.observability.metrics_collector import StorageMetrics
    from testbed.sglang_pools import make_host_pool

    pool = make_host_pool("mha", "layer_first")
    b = backend(pool, {"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]},
                mla=False, layout="layer_first")
    try:
        ks = hkeys(2)
        b.batch_set_v1(ks, indices(0, 2))
        b.batch_get_v1(ks, indices(4, 2))
        m = b.get_stats()
        assert isinstance(m, StorageMetrics)
        assert m.backup_pgs == [2] and m.prefetch_pgs == [2] and len(m.prefetch_bandwidth) == 1
        assert b.get_stats().prefetch_pgs == []  # drained
        assert b.stats()["counters"]["get_hits"] == 2
    finally:
        b.close()


def test_fresh_process_reads_what_another_wrote(s3_env, prefix):
    """Instance A writes through SGLang's pool; B, a new process with an empty index, reads."""
    from testbed.sglang_pools import fill_random, make_host_pool, page_bytes

    src = make_host_pool("mha", "layer_first")
    fill_random(src, seed=5)
    extra = {"tiers": [s3_tier(s3_env, prefix)]}
    a = backend(src, extra, mla=False, layout="layer_first")
    ks = hkeys(6)
    assert all(a.batch_set_v1(ks, indices(0, 6)))
    a.close()
    want = b"".join(page_bytes(src, indices(0, 6)))
    here = os.path.dirname(__file__)
    code = textwrap.dedent(f"""
        import sys, hashlib
        sys.path.insert(0, {here!r})
        from testbed import cpu_shims
        cpu_shims.install()
        import sglang.srt.mem_cache.memory_pool
        cpu_shims.install_cpu_hicache_patches()
        from testbed.sglang_pools import make_host_pool, page_bytes, storage_config
        from engine_util import keys
        from sglang_objectcache.sglang.backend import ObjectCacheStorage
        import torch
        pool = make_host_pool("mha", "layer_first")
        b = ObjectCacheStorage(storage_config(mla=False, layout="layer_first", extra={extra!r}), pool)
        ks = keys(6); idx = torch.arange(16 * 7, 16 * 13)
        print("RESULT", b.batch_exists(ks), all(b.batch_get_v1(ks, idx)),
              hashlib.sha256(b"".join(page_bytes(pool, idx))).hexdigest())
        b.close()
    """)
    import hashlib

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    assert line[0].split()[1:] == ["6", "True", hashlib.sha256(want).hexdigest()]
