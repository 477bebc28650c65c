"""`ObjectCacheLinker` (SGLang 0.5.23's external cache linker) on CPU, against real S3 servers.

The linker is driven the way `UnifiedCacheLinkerWrapper` drives it (lookup at match, load at
admission, start at batch build, the KV pool's `wait_until` per layer, finish after the forward,
offload on write-through), over a real `MHATokenToKVPool` on CPU. Objects are interchangeable with
the HiCache route's: written by one, read by the other, both ways.
"""

from __future__ import annotations

import inspect
import threading
import time
import types

import pytest
import torch

from conftest import s3_tier
from sglang_objectcache.sglang.compat import sglang_version

pytestmark = [
    pytest.mark.usefixtures("sglang_cpu"),
    pytest.mark.skipif(sglang_version() != "0.5.23", reason="the external cache linker is SGLang 0.5.23's"),
]

PAGE, LAYERS, HEADS, DIM, SLOTS = 16, 4, 2, 32, 1024
MODEL = "tiny-llama"


def _kv():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    kv = MHATokenToKVPool(SLOTS, PAGE, torch.bfloat16, HEADS, DIM, LAYERS, "cpu", False, start_layer=0,
                          end_layer=LAYERS - 1)
    g = torch.Generator().manual_seed(7)
    for buf in (*kv.k_buffer, *kv.v_buffer):
        buf.view(torch.uint8).copy_(torch.randint(0, 256, buf.view(torch.uint8).shape, dtype=torch.uint8,
                                                  generator=g))
    return kv


def _linker(kv, extra: dict):
    from sglang.srt.mem_cache.unified_cache.components import ComponentType

    from sglang_objectcache.sglang.linker import ObjectCacheLinker

    params = types.SimpleNamespace(token_to_kv_pool_allocator=types.SimpleNamespace(get_kvcache=lambda: kv))
    args = types.SimpleNamespace(served_model_name=MODEL)
    return ObjectCacheLinker(args, params, components={ComponentType.FULL}, extra_config=extra,
                             forward_stream=None)


def _eventually(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise (random bytes hold NaNs, which never compare equal)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _keys(n: int, salt: str = "") -> list[str]:
    return [f"{salt}{i:060x}" for i in range(1, n + 1)]


def _slots(first_page: int, pages: int) -> torch.Tensor:
    return torch.arange(first_page * PAGE, (first_page + pages) * PAGE, dtype=torch.int64)


def _rows(kv, slots: torch.Tensor):
    return [(kv.k_buffer[i][slots].clone(), kv.v_buffer[i][slots].clone()) for i in range(LAYERS)]


def _offload(linker, keys, slots) -> bool:
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer

    assert linker.offload([PoolTransfer(name=PoolName.KV, device_indices=slots, keys=keys)])
    deadline = time.monotonic() + 30
    while linker.num_completed_offloads() == 0:
        assert time.monotonic() < deadline, "offload never completed"
        time.sleep(0.01)
    ok = linker.pop_completed_offload()
    linker.cache.flush()
    return ok


def _load(linker, rid: str, keys, slots):
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer

    return linker.load(rid, [PoolTransfer(name=PoolName.KV, device_indices=slots, keys=keys)])


def _lookup(linker, keys) -> int:
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer

    found = linker.lookup("r", [PoolTransfer(name=PoolName.KV, keys=keys)])
    assert found == list(range(1, len(found) + 1))
    return len(found)


@pytest.fixture
def kv():
    return _kv()


# ---- the interface SGLang calls ------------------------------------------------------------

def test_the_linker_interface_is_the_one_we_implement():
    """An SGLang upgrade that changes the linker contract fails here, loudly, not in production."""
    from sglang.srt.mem_cache.unified_cache import linker_factory
    from sglang.srt.mem_cache.unified_cache.unified_cache_linker import LayerWiseLoadCounter, UnifiedCacheLinker

    from sglang_objectcache.sglang.linker import ObjectCacheLinker

    want = {
        "lookup": "(self, rid: 'str', transfers: 'list[PoolTransfer]') -> 'list[int]'",
        "load": "(self, rid: 'str', transfers: 'list[PoolTransfer]') -> 'bool'",
        "start_layer_wise_loading": "(self) -> 'int'",
        "finish_layer_wise_loading": "(self, counter_index: 'int') -> 'bool'",
        "cancel_queued_load": "(self, rid: 'str') -> 'bool'",
        "offload": "(self, transfers: 'list[PoolTransfer]', session_id: 'Optional[str]' = None) -> 'bool'",
        "num_completed_offloads": "(self) -> 'int'",
        "pop_completed_offload": "(self) -> 'bool'",
        "reset": "(self) -> 'None'",
        "close": "(self) -> 'None'",
    }
    assert set(UnifiedCacheLinker.__abstractmethods__) == set(want)
    for name, sig in want.items():
        assert str(inspect.signature(getattr(UnifiedCacheLinker, name))) == sig, name
        assert list(inspect.signature(getattr(ObjectCacheLinker, name)).parameters) == \
            list(inspect.signature(getattr(UnifiedCacheLinker, name)).parameters), name
    assert not inspect.isabstract(ObjectCacheLinker)
    # how the `dynamic` factory builds it
    src = inspect.getsource(linker_factory.create_unified_cache_linker)
    assert "components=components," in src and "extra_config=deepcopy(config.linker_extra_config)," in src
    assert "forward_stream=forward_stream," in src
    # the counter's surface the KV pool and the tp worker use
    for name in ("update_producer", "set_consumer", "complete", "fail", "wait_until", "finish", "reset"):
        assert callable(getattr(LayerWiseLoadCounter, name))


def test_config_errors_name_the_key(tmp_path):
    from sglang_objectcache.errors import ConfigError
    from sglang_objectcache.sglang.linker import linker_config

    with pytest.raises(ConfigError, match="config_file"):
        linker_config({})
    with pytest.raises(ConfigError, match="not both"):
        linker_config({"config_file": "/x.yaml", "tiers": []})
    with pytest.raises(ConfigError, match="cannot read"):
        linker_config({"config_file": str(tmp_path / "missing.yaml")})
    f = tmp_path / "oc.yaml"
    f.write_text("tiers:\n  - kind: disk\n    path: /tmp/x\n    capacity: 1GiB\n")
    cfg, opts = linker_config({"config_file": str(f), "staging_bytes": "64MiB", "loads_per_batch": 1})
    assert cfg.tiers[0].capacity == 1 << 30 and opts.staging_bytes == 64 << 20 and opts.loads_per_batch == 1
    with pytest.raises(ConfigError, match="staging_bytes"):
        linker_config({"config_file": str(f), "staging_bytes": "lots"})
    with pytest.raises(ConfigError, match="loads_per_batch"):
        linker_config({"config_file": str(f), "loads_per_batch": -1})


# ---- round trips -----------------------------------------------------------------------------

def test_offload_then_load_layer_by_layer(kv, s3_env, prefix):
    linker = _linker(kv, {"tiers": [s3_tier(s3_env, prefix)]})
    try:
        keys, src = _keys(8), _slots(0, 8)
        want = _rows(kv, src)
        assert _offload(linker, keys, src)
        assert _lookup(linker, keys) == 8
        assert _lookup(linker, keys + _keys(2, "f")) == 8  # the leading run only
        dst = _slots(20, 8)
        assert _load(linker, "a", keys, dst)
        idx = linker.start_layer_wise_loading()
        assert idx >= 0 and linker.start_layer_wise_loading() == -1  # nothing more queued
        counter = linker.layer_done_counter
        counter.set_consumer(idx)
        for layer in range(LAYERS):
            counter.wait_until(layer)  # what get_key_buffer(layer) does before the forward reads it
            assert _same(kv.k_buffer[layer][dst], want[layer][0]), layer
            assert _same(kv.v_buffer[layer][dst], want[layer][1]), layer
        assert linker.finish_layer_wise_loading(idx)
        assert linker._reserved == 0
    finally:
        linker.close()


def test_layer_l_is_there_when_its_wait_returns_and_not_before_its_bytes(kv, s3_env, prefix):
    """With the read rate capped the layers arrive over about a second: the forward's wait for
    layer l returns once layer l is in the device slots, while later layers are still on the wire."""
    writer = _linker(kv, {"tiers": [s3_tier(s3_env, prefix)], "pages_per_object": 8})
    keys, src = _keys(16), _slots(0, 16)
    want = _rows(kv, src)
    try:
        assert _offload(writer, keys, src)
    finally:
        writer.close()
    # 256 KiB at 256 KiB/s, in ranges of one layer of one 8-page object (32 KiB)
    reader = _linker(kv, {"tiers": [s3_tier(s3_env, prefix)], "timeout": 30, "bandwidth": "256KiB",
                          "read_range_bytes": "32KiB", "pages_per_object": 8})
    try:
        assert _lookup(reader, keys) == 16  # the index: no request
        dst = _slots(30, 16)
        kv.k_buffer[LAYERS - 1][dst] = 0
        assert _load(reader, "a", keys, dst)
        t0 = time.monotonic()
        idx = reader.start_layer_wise_loading()
        counter = reader.layer_done_counter
        counter.set_consumer(idx)
        counter.wait_until(0)
        first = time.monotonic() - t0
        assert _same(kv.k_buffer[0][dst], want[0][0])
        # layer 0 is in while the last layer is not yet
        assert not _same(kv.k_buffer[LAYERS - 1][dst], want[LAYERS - 1][0])
        for layer in range(LAYERS):
            counter.wait_until(layer)
            assert _same(kv.v_buffer[layer][dst], want[layer][1])
        last = time.monotonic() - t0
        assert last > first * 1.5, (first, last)
        assert reader.finish_layer_wise_loading(idx)
    finally:
        reader.close()


def test_objects_are_shared_with_the_hicache_route_both_ways(kv, s3_env, prefix):
    """What the HiCache route (`--hicache-storage-backend objectcache`) wrote loads through the
    linker, and what the linker offloaded loads through the HiCache route: same keys, same
    fingerprint, same bytes."""
    from testbed.sglang_pools import make_host_pool, storage_config

    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    extra = {"tiers": [s3_tier(s3_env, prefix)]}
    host = make_host_pool("mha", "layer_first", page_size=PAGE, layers=LAYERS, heads=HEADS, head_dim=DIM,
                          tokens=SLOTS)
    backend = ObjectCacheStorage(storage_config(mla=False, layout="layer_first", extra=extra, model=MODEL), host)
    linker = _linker(kv, extra)
    try:
        assert backend.fp == linker.fp
        # HiCache route -> linker: pages in the host pool, stored by the backend, loaded by the linker
        keys, src = _keys(4, "h"), _slots(0, 4)
        host_idx = torch.arange(0, 4 * PAGE, dtype=torch.int64)
        for i in range(LAYERS):
            host.kv_buffer[0, i, host_idx] = kv.k_buffer[i][src]
            host.kv_buffer[1, i, host_idx] = kv.v_buffer[i][src]
        assert backend.batch_set_v1(keys, host_idx) == [True] * 4
        backend.cache.flush()
        want = _rows(kv, src)
        dst = _slots(40, 4)
        assert _eventually(lambda: _lookup(linker, keys) == 4)  # another writer: the index heals (a miss nudges it)
        assert _load(linker, "a", keys, dst)
        idx = linker.start_layer_wise_loading()
        assert linker.finish_layer_wise_loading(idx)
        assert all(_same(kv.k_buffer[i][dst], want[i][0]) and _same(kv.v_buffer[i][dst], want[i][1])
                   for i in range(LAYERS))
        # linker -> HiCache route
        keys2, src2 = _keys(4, "l"), _slots(8, 4)
        assert _offload(linker, keys2, src2)
        assert _eventually(lambda: backend.batch_exists(keys2) == 4)
        host_idx2 = torch.arange(8 * PAGE, 12 * PAGE, dtype=torch.int64)
        assert backend.batch_get_v1(keys2, host_idx2) == [True] * 4
        want2 = _rows(kv, src2)
        assert all(_same(host.kv_buffer[0, i, host_idx2], want2[i][0])
                   and _same(host.kv_buffer[1, i, host_idx2], want2[i][1]) for i in range(LAYERS))
    finally:
        linker.close()
        backend.close()


# ---- failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_a_corrupt_object_fails_the_batch_in_bounded_time_and_frees_staging(kv, s3_env, prefix):
    import boto3

    linker = _linker(kv, {"tiers": [s3_tier(s3_env, prefix)], "timeout": 10})
    try:
        keys, src = _keys(16), _slots(0, 16)
        assert _offload(linker, keys, src)
        s3 = boto3.client("s3", **s3_env.client_kwargs())
        names = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)["Contents"]
                       if "/d/" in o["Key"])
        size = s3.head_object(Bucket=s3_env.bucket, Key=names[-1])["ContentLength"]
        s3.put_object(Bucket=s3_env.bucket, Key=names[-1], Body=b"\x5a" * size)
        assert _load(linker, "bad", keys, _slots(30, 16))
        t0 = time.monotonic()
        idx = linker.start_layer_wise_loading()
        counter = linker.layer_done_counter
        counter.set_consumer(idx)
        for layer in range(LAYERS):
            counter.wait_until(layer)  # never hangs: a failed layer resolves too
        assert linker.finish_layer_wise_loading(idx) is False  # SGLang aborts the batch's loaders
        assert time.monotonic() - t0 < 10
        assert linker._reserved == 0 and linker.counts["failed_batches"] == 1
        # the next batch, of good objects, loads
        keys2, src2 = _keys(2, "g"), _slots(60, 2)
        assert _offload(linker, keys2, src2)
        want = _rows(kv, src2)
        assert _load(linker, "good", keys2, _slots(50, 2))
        idx = linker.start_layer_wise_loading()
        assert linker.finish_layer_wise_loading(idx)
        assert _same(kv.k_buffer[1][_slots(50, 2)], want[1][0])
    finally:
        linker.close()


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_a_dead_server_fails_the_load_within_the_deadline(kv, s3_env, prefix):
    from testbed.proxy import Proxy

    proxy = Proxy(s3_env.port)
    linker = _linker(kv, {"tiers": [s3_tier(s3_env, prefix, endpoint=proxy.endpoint)], "timeout": 3})
    try:
        keys = _keys(4)
        assert _offload(linker, keys, _slots(0, 4))
        proxy.down()
        assert _load(linker, "a", keys, _slots(10, 4))
        t0 = time.monotonic()
        idx = linker.start_layer_wise_loading()
        assert linker.finish_layer_wise_loading(idx) is False
        assert time.monotonic() - t0 < 3 + 5
    finally:
        proxy.close()
        linker.close()


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_loads_past_the_staging_budget_are_refused_the_same_way_on_every_rank(kv, s3_env, prefix):
    page_bytes = LAYERS * 2 * PAGE * HEADS * DIM * 2
    linker = _linker(kv, {"tiers": [s3_tier(s3_env, prefix)], "staging_bytes": 6 * page_bytes})
    try:
        assert _load(linker, "a", _keys(4), _slots(0, 4))
        assert not _load(linker, "b", _keys(4, "b"), _slots(4, 4))  # 8 pages > 6: recompute
        assert _load(linker, "c", _keys(2, "c"), _slots(8, 2))
        assert linker.cancel_queued_load("a") and not linker.cancel_queued_load("a")
        assert _load(linker, "b", _keys(4, "b"), _slots(4, 4))  # room again
        assert linker.counts["refused"] == 1
    finally:
        linker.close()


@pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)
def test_one_load_per_batch_when_asked(kv, s3_env, prefix):
    """`loads_per_batch: 1`: a second hit admitted into the same batch is refused (SGLang recomputes
    it), so a failed load can abort only its own request; the next batch takes a load again."""
    linker = _linker(kv, {"tiers": [s3_tier(s3_env, prefix)], "loads_per_batch": 1})
    try:
        assert _load(linker, "a", _keys(2), _slots(0, 2))
        assert not _load(linker, "b", _keys(2, "b"), _slots(2, 2))
        idx = linker.start_layer_wise_loading()
        linker.finish_layer_wise_loading(idx)  # a miss in storage: this batch fails, b was never in it
        assert _load(linker, "b", _keys(2, "b"), _slots(2, 2))
    finally:
        linker.close()


def test_unsupported_setups_are_refused_at_startup(kv, s3_env, prefix):
    from sglang.srt.mem_cache.unified_cache.components import ComponentType

    from sglang_objectcache.errors import ConfigError
    from sglang_objectcache.sglang.linker import ObjectCacheLinker

    params = types.SimpleNamespace(token_to_kv_pool_allocator=types.SimpleNamespace(get_kvcache=lambda: kv))
    extra = {"tiers": [s3_tier(s3_env, prefix)]}
    with pytest.raises(ConfigError, match="SWA"):
        ObjectCacheLinker(types.SimpleNamespace(served_model_name=MODEL), params,
                          components={ComponentType.FULL, ComponentType.SWA}, extra_config=extra)
    params.mtp_draft_device_pools = [object()]
    with pytest.raises(ConfigError, match="draft"):
        ObjectCacheLinker(types.SimpleNamespace(served_model_name=MODEL), params,
                          components={ComponentType.FULL}, extra_config=extra)


def test_many_layers_wait_concurrently(kv, s3_env, prefix):
    """Two requests in one batch: every layer is completed once both requests' bytes are in."""
    linker = _linker(kv, {"tiers": [s3_tier(s3_env, prefix)]})
    try:
        ka, kb = _keys(3, "a"), _keys(5, "b")
        sa, sb = _slots(0, 3), _slots(3, 5)
        wa, wb = _rows(kv, sa), _rows(kv, sb)
        assert _offload(linker, ka, sa) and _offload(linker, kb, sb)
        da, db = _slots(40, 3), _slots(43, 5)
        assert _load(linker, "a", ka, da) and _load(linker, "b", kb, db)
        idx = linker.start_layer_wise_loading()
        counter = linker.layer_done_counter
        counter.set_consumer(idx)
        seen = []

        def forward():
            for layer in range(LAYERS):
                counter.wait_until(layer)
                seen.append(_same(kv.k_buffer[layer][da], wa[layer][0])
                            and _same(kv.v_buffer[layer][db], wb[layer][1]))

        t = threading.Thread(target=forward)
        t.start()
        t.join(30)
        assert seen == [True] * LAYERS
        assert linker.finish_layer_wise_loading(idx)
    finally:
        linker.close()


def test_mla_round_trip_and_the_hicache_routes_objects(s3_env, prefix):
    """An MLA model: one latent per token and layer, replicated across TP ranks (one copy in
    storage); the linker's fingerprint is the HiCache route's, and its loads land per layer."""
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
    from testbed.sglang_pools import make_host_pool, storage_config

    from sglang_objectcache.sglang.backend import ObjectCacheStorage

    kv = MLATokenToKVPool(SLOTS, PAGE, torch.bfloat16, 64, 16, LAYERS, "cpu", False, start_layer=0,
                          end_layer=LAYERS - 1)
    for buf in kv.kv_buffer:
        raw = buf.view(torch.uint8)
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3)))
    extra = {"tiers": [s3_tier(s3_env, prefix)]}
    linker = _linker(kv, extra)
    host = make_host_pool("mla", "layer_first", page_size=PAGE, layers=LAYERS, tokens=SLOTS)
    backend = ObjectCacheStorage(storage_config(mla=True, layout="layer_first", extra=extra, model=MODEL), host)
    try:
        assert linker.fp == backend.fp and linker.fp.attention == "mla" and linker.writes
        keys, src = _keys(4, "m"), _slots(0, 4)
        want = [kv.kv_buffer[i][src].clone() for i in range(LAYERS)]
        assert _offload(linker, keys, src)
        dst = _slots(20, 4)
        assert _load(linker, "a", keys, dst)
        idx = linker.start_layer_wise_loading()
        counter = linker.layer_done_counter
        counter.set_consumer(idx)
        for layer in range(LAYERS):
            counter.wait_until(layer)
            assert _same(kv.kv_buffer[layer][dst], want[layer]), layer
        assert linker.finish_layer_wise_loading(idx)
        # the HiCache route reads the same objects into its host pool
        assert _eventually(lambda: backend.batch_exists(keys) == 4)
        host_idx = torch.arange(0, 4 * PAGE, dtype=torch.int64)
        assert backend.batch_get_v1(keys, host_idx) == [True] * 4
        assert all(_same(host.kv_buffer[i][host_idx], want[i]) for i in range(LAYERS))
    finally:
        linker.close()
        backend.close()
