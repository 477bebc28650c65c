"""The plugin route: SGLang's own argument parsing, factory and cache controller, on CPU."""

from __future__ import annotations

import argparse
import threading
import types

import pytest

pytestmark = pytest.mark.usefixtures("sglang_cpu")


@pytest.fixture(scope="module")
def plugins_loaded():
    """What `python -m sglang.launch_server` does first: load the sglang.srt.plugins entry points
    (ours among them, from this package's metadata) and apply their hooks."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    return True


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("objectcache") == "sglang_objectcache.sglang.plugin:register"


def test_sglang_argument_parser_accepts_objectcache(plugins_loaded, tmp_path):
    from sglang.srt.server_args import ServerArgs

    cfg = tmp_path / "objectcache.yaml"
    cfg.write_text("tiers:\n  - kind: disk\n    path: /tmp/x\n    capacity: 1GiB\n")
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", "m", "--enable-hierarchical-cache",
                            "--hicache-mem-layout", "layer_first",
                            "--hicache-storage-backend", "objectcache",
                            "--hicache-storage-backend-extra-config", f"@{cfg}"])
    assert ns.hicache_storage_backend == "objectcache"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "m", "--hicache-storage-backend", "objectcash"])


def test_factory_builds_our_class_with_the_host_pool(plugins_loaded, tmpdir_path):
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from testbed.sglang_pools import make_host_pool, storage_config

    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    pool = make_host_pool("mha", "layer_first")
    cfg = storage_config(mla=False, layout="layer_first",
                         extra={"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]})
    backend = StorageBackendFactory.create_backend("objectcache", cfg, pool)
    try:
        assert isinstance(backend, ObjectCacheStorage)
        assert backend.mem_pool_host is pool and backend.cache is not None
    finally:
        backend.close()


def test_dynamic_route_works_without_the_plugin(tmpdir_path):
    """`--hicache-storage-backend dynamic` (no plugin needed) passes {} instead of the pool."""
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from testbed.sglang_pools import make_host_pool, storage_config

    pool = make_host_pool("mha", "layer_first")
    extra = {"backend_name": "objectcache", "module_path": "sglang_objectcache.sglang.backend",
             "class_name": "ObjectCacheStorage", "interface_v1": 1,
             "tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]}
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(mla=False, layout="layer_first",
                                                                             extra=extra), pool)
    try:
        assert backend.cache is None
        backend.register_mem_pool_host(pool)
        assert backend.cache is not None
    finally:
        backend.close()


def test_controller_selects_the_zero_copy_functions(plugins_loaded, tmpdir_path, monkeypatch):
    """SGLang's real HiCacheController.attach_storage_backend, with only its process-group and
    thread plumbing stubbed, ends up with batch_get_v1/batch_set_v1 for objectcache."""
    from sglang.srt.managers import cache_controller as cc
    from testbed.sglang_pools import make_host_pool, storage_config

    pool = make_host_pool("mha", "layer_first")
    extra = {"tiers": [{"kind": "disk", "path": tmpdir_path, "capacity": "1GiB"}]}
    ctrl = object.__new__(cc.HiCacheController)
    parallel = types.SimpleNamespace(attn_dcp_size=1, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    monkeypatch.setattr(cc, "get_parallel", lambda: parallel, raising=False)
    ctrl.__dict__.update(
        enable_storage=False, mem_pool_host=pool, storage_host_pool=pool, page_size=pool.page_size,
        host_memory_mode="cache", enable_storage_metrics=False, draft_mem_pool_host=None,
        _stop_storage_threads=lambda: None, _create_prefetch_sync_groups=lambda: None,
        _start_storage_threads=lambda: None, _maybe_register_draft_with_storage=lambda: None,
        _destroy_prefetch_sync_groups=lambda: None, _registers_host_pools_after_super_attach=False,
        attn_cp_group=None, attn_tp_group=None, tp_group=None, pp_group=None,
        storage_stop_event=threading.Event(),
        _generate_storage_config=lambda model_name=None, extra_config=None: storage_config(
            mla=False, layout="layer_first", extra=extra_config or {}),
    )
    ctrl.attach_storage_backend("objectcache", 256, "tiny", dict(extra))
    try:
        assert ctrl.page_get_func == ctrl._page_get_zero_copy
        assert ctrl.page_set_func == ctrl._page_set_zero_copy
        assert type(ctrl.storage_backend).__name__ == "ObjectCacheStorage"
    finally:
        ctrl.storage_backend.close()


def test_sglang_launch_server_offers_objectcache():
    """`python -m sglang.launch_server` itself (its __main__ block: load_plugins, then argument
    parsing), in a fresh process; only the CPU import shims are added."""
    import os
    import subprocess
    import sys

    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "from testbed import cpu_shims; cpu_shims.install()\n"
            "import runpy, sys; sys.argv = ['sglang.launch_server', '--help']\n"
            "runpy.run_module('sglang.launch_server', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next((x for x in out.stdout.splitlines() if "--hicache-storage-backend {" in x), "")
    assert ",objectcache}" in line, out.stdout[-2000:] + out.stderr[-2000:]
