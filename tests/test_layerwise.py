"""Layer-wise streaming (patches/sglang-0.5.17) through SGLang's real HiRadixCache and
HiCacheController on CPU, with our backend on a real local S3 server.

The read rate is capped so the layers of a prefix arrive over about a second: the gate in front of
layer l's host-to-device copy must open when layer l has landed while later layers are in flight,
the KV the "forward" reads per layer must equal what was stored, and a failure after admission must
end in an abort with the tree cleaned, never in garbage KV being kept.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from sglang_objectcache.sglang.compat import sglang_version

pytestmark = [
    pytest.mark.usefixtures("sglang_cpu"),
    pytest.mark.skipif(sglang_version() != "0.5.17", reason="the layer-wise patch set is for SGLang 0.5.17"),
]

PAGE, LAYERS, TOKENS = 16, 8, 512  # 32 pages of 16 KiB per layer: 4 MiB in all
PATCHED = ("sglang/srt/managers/cache_controller.py", "sglang/srt/mem_cache/hiradix_cache.py",
           "sglang/srt/managers/scheduler_components/batch_result_processor.py",
           "sglang/srt/managers/schedule_batch.py", "sglang/srt/mem_cache/utils.py",
           "sglang/srt/managers/scheduler.py", "sglang/srt/disaggregation/decode_hicache_mixin.py",
           "sglang/srt/disaggregation/decode_kvcache_offload_manager.py",
           "sglang/srt/mem_cache/hybrid_cache/hybrid_cache_controller.py")


# ---- the patch itself ----------------------------------------------------------------------

def _pristine_copy(tmp_path: Path) -> Path:
    """The patched files as SGLang ships them, in a fake site-packages under tmp_path."""
    from sglang_objectcache.sglang import patcher

    site = patcher._site()
    for rel in PATCHED:
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        orig = site / (rel + patcher.BACKUP_SUFFIX)
        shutil.copy(orig if orig.exists() else site / rel, dst)
    assert patcher.state("0.5.17", tmp_path) == "clean"
    return tmp_path


def test_patch_applies_cleanly_is_idempotent_and_reverts(tmp_path):
    from sglang_objectcache.sglang import patcher

    site = _pristine_copy(tmp_path)
    before = {rel: (site / rel).read_text() for rel in PATCHED}
    assert len(patcher.apply("0.5.17", site)) == len(PATCHED)
    assert patcher.state("0.5.17", site) == "applied"
    assert patcher.apply("0.5.17", site) == []  # idempotent
    for rel in PATCHED:
        compile((site / rel).read_text(), rel, "exec")  # the patched modules are valid Python
    assert len(patcher.apply("0.5.17", site, reverse=True)) == len(PATCHED)
    assert {rel: (site / rel).read_text() for rel in PATCHED} == before
    assert not list(site.rglob("*" + patcher.BACKUP_SUFFIX))


def test_patch_refuses_a_foreign_source(tmp_path):
    from sglang_objectcache.sglang import patcher

    site = _pristine_copy(tmp_path)
    target = site / PATCHED[1]
    text = target.read_text()
    line = "        if not self.can_terminate_prefetch(operation):"  # context of the admission hunk
    assert text.count(line) == 1
    target.write_text(text.replace(line, "        if not self.can_terminate_prefetch(operation):  # local edit"))
    before = (site / PATCHED[0]).read_text()
    with pytest.raises(patcher.PatchError, match="neither unpatched nor patched"):
        patcher.apply("0.5.17", site)
    assert (site / PATCHED[0]).read_text() == before  # nothing written


def test_patch_from_an_older_release_is_replaced_from_the_backups(tmp_path):
    """An upgrade of this package finds SGLang patched by the previous release: neither pristine
    nor patched by this one. The backups of SGLang's originals let it re-patch, and revert."""
    from sglang_objectcache.sglang import patcher

    site = _pristine_copy(tmp_path)
    before = {rel: (site / rel).read_text() for rel in PATCHED}
    patcher.apply("0.5.17", site)
    fresh = {rel: (site / rel).read_text() for rel in PATCHED}
    old = site / PATCHED[0]  # what an older patch might have left: an added line that differs
    old.write_text(old.read_text().replace("# objectcache: layer i is in host memory", "# objectcache v0"))
    assert patcher.state("0.5.17", site) == "outdated"
    assert len(patcher.apply("0.5.17", site)) == len(PATCHED)
    assert {rel: (site / rel).read_text() for rel in PATCHED} == fresh
    old.write_text(old.read_text().replace("# objectcache: layer i is in host memory", "# objectcache v0"))
    assert len(patcher.apply("0.5.17", site, reverse=True)) == len(PATCHED)
    assert {rel: (site / rel).read_text() for rel in PATCHED} == before


def test_an_upgrade_that_patches_one_more_file_applies_it(tmp_path):
    """The previous release patched three files; this one also patches schedule_batch.py, which
    is still SGLang's own (no backup). The upgrade patches it and keeps the others."""
    from sglang_objectcache.sglang import patcher

    site = _pristine_copy(tmp_path)
    before = {rel: (site / rel).read_text() for rel in PATCHED}
    patcher.apply("0.5.17", site)
    fresh = {rel: (site / rel).read_text() for rel in PATCHED}
    newer = site / PATCHED[-1]
    newer.write_text(before[PATCHED[-1]])  # as the previous release left it: untouched
    newer.with_name(newer.name + patcher.BACKUP_SUFFIX).unlink()
    assert patcher.state("0.5.17", site) == "outdated"
    patcher.apply("0.5.17", site)
    assert {rel: (site / rel).read_text() for rel in PATCHED} == fresh
    assert patcher.state("0.5.17", site) == "applied"
    patcher.apply("0.5.17", site, reverse=True)
    assert {rel: (site / rel).read_text() for rel in PATCHED} == before


def test_the_batch_copy_for_result_processing_keeps_the_load_index():
    """With overlap scheduling, results are processed on `batch.copy()`; `abort_failed` finds the
    batch's gated load through `hicache_consumer_index`, so the copy must keep it (04 hunk)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    b = ScheduleBatch(reqs=[])
    b.hicache_consumer_index = 2
    for name in ("extend_num_tokens", "launch_ts", "forward_iter", "fpm_start_time"):
        if not hasattr(b, name):
            setattr(b, name, None)
    assert b.copy().hicache_consumer_index == 2


def test_patch_sglang_cli_checks_the_version(capsys, monkeypatch):
    """`--check` reports the installed release's state (CI patched it: applied, exit 0); a release
    with no patch set is refused with the reason (exit 2), and nothing is written."""
    from sglang_objectcache.cli.main import main
    from sglang_objectcache.sglang import patcher

    rc = main(["patch-sglang", "--check"])
    assert (rc, capsys.readouterr().out) == (0, "sglang 0.5.17: patch set applied\n")
    monkeypatch.setattr("sglang_objectcache.sglang.compat.importlib.metadata.version", lambda name: "0.5.99")
    assert main(["patch-sglang"]) == 2
    assert "0.5.99" in capsys.readouterr().err
    assert patcher.state("0.5.17") == "applied"


def test_installed_sglang_is_patched_and_imports():
    """CI applies the patch (`objectcache patch-sglang`) before the tests: the real modules carry it."""
    from sglang.srt.managers import cache_controller
    from sglang.srt.managers.scheduler_components import batch_result_processor  # noqa: F401
    from sglang.srt.mem_cache import hiradix_cache  # noqa: F401

    assert getattr(cache_controller.HiCacheController, "oc_layerwise_patch", False), \
        "run `objectcache patch-sglang` in this environment first"


# ---- streaming through the real tree and controller ----------------------------------------

# SeaweedFS only: the streaming path does not depend on the server
seaweedfs_only = pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True)


@pytest.fixture
def tree(s3_env, prefix):
    from testbed.hiradix import build_tree

    extra = {"tiers": [{"kind": "s3", "endpoint": s3_env.endpoint, "bucket": s3_env.bucket, "prefix": prefix}],
             "pages_per_object": 8, "read_range_bytes": "128KiB", "bandwidth": "4MiB", "timeout": 20,
             "prefetch_threshold": 64}
    t = build_tree(extra, layers=LAYERS, page_size=PAGE)
    yield t
    t.cache_controller.storage_backend.close()


def _admit(tree, tokens, rid="r1"):
    """What the scheduler does for a new request until `check_prefetch_progress` lets it in."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
    tree.prefetch_from_storage(rid, m.last_host_node, tokens)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        tree.check_hicache_events()
        if tree.check_prefetch_progress(rid):
            return
        time.sleep(0.005)
    raise AssertionError("request not admitted")


def _load(tree, tokens):
    """Admission is followed by a match (host nodes now), a load-back and start_loading."""
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
    assert m.host_hit_length == len(tokens)
    dev, last = tree.init_load_back(InitLoadBackParams(best_match_node=m.best_match_node,
                                                       host_hit_length=m.host_hit_length))
    assert len(dev) == len(tokens)
    return dev, last, tree.ready_to_load_host_cache()


@seaweedfs_only
def test_gate_opens_per_layer_while_later_layers_stream(tree, s3_env):
    from testbed.hiradix import store_prefix

    cc = tree.cache_controller
    lw = cc.oc_layerwise
    assert lw is not None
    tokens = list(range(1, TOKENS + 1))
    want = store_prefix(tree, tokens)
    python_own = sys.getswitchinterval()
    cache, calls = cc.storage_backend.cache, []
    fetch = cache.fetch

    def recorded(*a, **kw):
        calls.append(kw)
        return fetch(*a, **kw)
    cache.fetch = recorded

    _admit(tree, tokens)
    assert lw.counters["admitted"] == 1
    assert calls and all(kw.get("streamed") for kw in calls)  # so the first-layer hold applies
    (stream,) = lw._active
    dev, last, pid = _load(tree, tokens)
    gate = cc.layer_done_counter.events[pid].oc_gate
    assert gate is not None and gate.streams == [stream]

    counter = cc.layer_done_counter
    counter.set_consumer(pid)
    kv = cc.mem_pool_device
    seen = []
    for layer in range(LAYERS):  # the forward: each KV accessor waits for its layer
        counter.wait_until(layer)
        seen.append((time.monotonic(), stream.readiness.ready_layers))
        assert kv.k_buffer[layer][dev].equal(want[0, layer]), f"K of layer {layer}"
        assert kv.v_buffer[layer][dev].equal(want[1, layer]), f"V of layer {layer}"
        if layer == 0:  # reads and gated copies in flight: the GIL changes hands sooner
            assert sys.getswitchinterval() == pytest.approx(0.0002)
    # layer 0 was handed to the forward while the last layer was still on the wire
    assert seen[0][1] < LAYERS, seen
    assert gate.opened_at[0] < stream.readiness.ready_at[LAYERS - 1]
    assert gate.failed is None

    deadline = time.monotonic() + 10
    while lw._active and time.monotonic() < deadline:
        tree.check_hicache_events()
        time.sleep(0.01)
    assert not lw._active and stream.ok
    gate.join()

    # the prefill batch that ran this forward is one sample of what a streamed load costs
    assert gate.tokens == len(tokens)
    decide = cc.oc_decide
    mode = types.SimpleNamespace(is_extend=lambda: True, is_mixed=lambda: False)

    def batch(consumer, n, seconds):
        return types.SimpleNamespace(forward_mode=mode, hicache_consumer_index=consumer, extend_lens=[n],
                                     prefix_lens=[0], launch_ts=time.monotonic() - seconds)
    for n in (64, 128, 256, 512, 1024, 2048, 96, 192):
        decide.observe_prefill(batch(-1, n, 1e-5 * n))
    decide.observe_prefill(batch(pid, 64, 0.5 + sum(gate.stalled)))
    ((_, loaded, extra),) = decide.cost._rows
    assert loaded == len(tokens) and extra == pytest.approx(0.5, abs=0.05)
    deadline = time.monotonic() + 5  # the loader leaves just after its last layer
    while sys.getswitchinterval() != python_own and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sys.getswitchinterval() == python_own
    tree.dec_lock_ref(last)
    tree.loading_check()


@seaweedfs_only
def test_failure_after_admission_aborts_and_drops_the_nodes(tree, s3_env, prefix):
    import boto3
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from testbed.hiradix import store_prefix

    cc = tree.cache_controller
    lw = cc.oc_layerwise
    tokens = list(range(1, TOKENS + 1))
    store_prefix(tree, tokens, seed=1)
    s3 = boto3.client("s3", **s3_env.client_kwargs())
    names = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)["Contents"]
                   if "/d/" in o["Key"])
    host_free = cc.mem_pool_host.available_size()

    _admit(tree, tokens)
    (stream,) = lw._active
    # the last object turns into garbage of the same size after admission: its later layers fail
    size = s3.head_object(Bucket=s3_env.bucket, Key=names[-1])["ContentLength"]
    s3.put_object(Bucket=s3_env.bucket, Key=names[-1], Body=b"\x5a" * size)
    dev, last, pid = _load(tree, tokens)
    counter = cc.layer_done_counter
    counter.set_consumer(pid)
    done = threading.Event()

    def forward():
        for layer in range(LAYERS):
            counter.wait_until(layer)  # every gate opens, failure or not
        done.set()

    threading.Thread(target=forward, daemon=True).start()
    assert done.wait(30), "a failed stream left a gate closed"
    gate = cc.layer_done_counter.events[pid].oc_gate
    assert gate.failed and "corrupt" in gate.failed

    # the request holds the streamed nodes; the bystander in the same batch loaded other host data
    req = types.SimpleNamespace(host_hit_length=TOKENS, storage_hit_length=0, to_finish=None, last_node=last)
    bystander = types.SimpleNamespace(host_hit_length=64, storage_hit_length=0, to_finish=None,
                                      last_node=tree.root_node)
    lw.abort_failed(types.SimpleNamespace(hicache_consumer_index=pid, reqs=[req, bystander]))
    assert req.to_finish is not None and req.skip_radix_cache_insert
    assert "objectcache" in req.to_finish.message
    assert bystander.to_finish is None

    # the request ends: its lock and the load's lock go; the next scheduler steps drop the nodes
    tree.dec_lock_ref(last)
    deadline = time.monotonic() + 10
    while (lw._active or lw._poisoned or cc.ack_load_queue) and time.monotonic() < deadline:
        tree.check_hicache_events()
        time.sleep(0.01)
    assert lw.counters["failed"] == 1 and lw.counters["dropped_nodes"] >= 1
    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
    assert len(m.device_indices) == 0 and m.host_hit_length == 0
    assert cc.mem_pool_host.available_size() == host_free  # every host slot came back


@seaweedfs_only
def test_a_prefix_whose_objects_vanished_is_recomputed_the_second_time(tree, s3_env, prefix):
    """The index learned a prefix, then its objects vanished (another instance's clear(), a
    lifecycle rule): the first request may be admitted and abort; the index forgets the objects,
    so the second request is not streamed from storage: it recomputes, and succeeds."""
    import boto3
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from testbed.hiradix import store_prefix

    cc = tree.cache_controller
    lw = cc.oc_layerwise
    tokens = list(range(1, TOKENS + 1))
    store_prefix(tree, tokens, seed=2)
    keys = cc.get_hash_str(tokens, None, page_size=PAGE)
    assert cc.storage_backend.batch_exists(keys) == len(keys)
    s3 = boto3.client("s3", **s3_env.client_kwargs())
    for o in s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=prefix)["Contents"]:
        if "/d/" in o["Key"]:
            s3.delete_object(Bucket=s3_env.bucket, Key=o["Key"])

    _admit(tree, tokens, "r1")
    if lw._active:  # admitted while the hit streamed in: its forward sees the failure and aborts
        dev, last, pid = _load(tree, tokens)
        counter = cc.layer_done_counter
        counter.set_consumer(pid)
        for layer in range(LAYERS):
            counter.wait_until(layer)
        gate = counter.events[pid].oc_gate
        assert gate.failed
        req = types.SimpleNamespace(host_hit_length=TOKENS, storage_hit_length=0, to_finish=None, last_node=last)
        lw.abort_failed(types.SimpleNamespace(hicache_consumer_index=pid, reqs=[req]))
        assert req.to_finish is not None
        tree.dec_lock_ref(last)
    deadline = time.monotonic() + 10
    while (lw._active or lw._poisoned or cc.ack_load_queue) and time.monotonic() < deadline:
        tree.check_hicache_events()
        time.sleep(0.01)
    admitted = lw.counters["admitted"]

    assert cc.storage_backend.batch_exists(keys) == 0, "the vanished objects are forgotten"
    _admit(tree, tokens, "r2")
    assert lw.counters["admitted"] == admitted, "the second request is not streamed from storage"
    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
    assert m.host_hit_length == 0 and len(m.device_indices) == 0  # it recomputes the prefix


@seaweedfs_only
def test_a_copy_that_raises_opens_the_gates_and_still_acks_the_load(tree, s3_env, monkeypatch):
    """A host-to-device copy that raises on the loader thread: every gate opens with the failure,
    the batch is aborted, and the load is still acknowledged, so SGLang unlocks its nodes."""
    from testbed.hiradix import store_prefix

    cc = tree.cache_controller
    lw = cc.oc_layerwise
    tokens = list(range(1, TOKENS + 1))
    store_prefix(tree, tokens, seed=2)
    _admit(tree, tokens)
    real = cc.mem_pool_host.load_to_device_per_layer

    def broken(device_pool, host_indices, device_indices, layer_id, io_backend):
        if layer_id == 2:
            raise RuntimeError("copy engine fault")
        return real(device_pool, host_indices, device_indices, layer_id, io_backend)

    monkeypatch.setattr(cc.mem_pool_host, "load_to_device_per_layer", broken)
    dev, last, pid = _load(tree, tokens)
    counter = cc.layer_done_counter
    counter.set_consumer(pid)
    for layer in range(LAYERS):
        counter.wait_until(layer)  # no gate stays closed
    gate = counter.events[pid].oc_gate
    gate.join()
    assert gate.failed and "copy engine fault" in gate.failed
    req = types.SimpleNamespace(host_hit_length=TOKENS, storage_hit_length=0, to_finish=None, last_node=last)
    fresh = types.SimpleNamespace(host_hit_length=0, storage_hit_length=0, to_finish=None, last_node=tree.root_node)
    lw.abort_failed(types.SimpleNamespace(hicache_consumer_index=pid, reqs=[req, fresh]))
    assert req.to_finish is not None and req.skip_radix_cache_insert  # every request that loaded
    assert fresh.to_finish is None  # a request that loaded nothing computed over its own KV
    assert tree.ongoing_load_back  # the load holds its nodes until it is acknowledged
    tree.loading_check()
    assert not tree.ongoing_load_back and not cc.ack_load_queue  # acknowledged: nodes unlocked
    tree.dec_lock_ref(last)


@seaweedfs_only
def test_layerwise_false_keeps_the_classic_path(s3_env, prefix):
    from testbed.hiradix import build_tree

    extra = {"tiers": [{"kind": "s3", "endpoint": s3_env.endpoint, "bucket": s3_env.bucket, "prefix": prefix}],
             "layerwise": False}
    t = build_tree(extra, layers=LAYERS, page_size=PAGE)
    try:
        assert t.cache_controller.oc_layerwise is None
    finally:
        t.cache_controller.storage_backend.close()


def test_streaming_stays_off_where_failures_could_not_be_agreed():
    """Draft models and attention TP > 1 keep the classic path; so does a group of unknown size."""
    from sglang_objectcache.sglang.layerwise import _unsupported

    assert "draft" in _unsupported(types.SimpleNamespace(has_draft=True))
    assert _unsupported(types.SimpleNamespace(has_draft=False, attn_tp_group=None, tp_group=None)) == ""
    assert "cannot tell" in _unsupported(types.SimpleNamespace(has_draft=False, attn_tp_group=object()))


@seaweedfs_only
def test_runtime_reattach_of_another_backend_drops_the_streaming_state(s3_env, prefix, tmp_path, monkeypatch):
    """SGLang's PUT /hicache/storage-backend path: objectcache, then `file`, then objectcache with
    layerwise off. The file backend must not inherit objectcache's stream hooks."""
    from testbed.hiradix import build_tree

    extra = {"tiers": [{"kind": "s3", "endpoint": s3_env.endpoint, "bucket": s3_env.bucket, "prefix": prefix}]}
    t = build_tree(extra, layers=LAYERS, page_size=PAGE)
    cc = t.cache_controller
    first = cc.oc_layerwise
    assert first is not None and first._loader.alive
    ok, msg = t.detach_storage_backend()
    assert ok, msg
    monkeypatch.setenv("SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", str(tmp_path))
    ok, msg = t.attach_storage_backend("file", "{}")
    assert ok, msg
    assert cc.oc_layerwise is None
    assert not first._loader.alive, "the replaced streaming state's loader thread is stopped"
    ok, msg = t.detach_storage_backend()
    assert ok, msg
    ok, msg = t.attach_storage_backend("objectcache", __import__("json").dumps(dict(extra, layerwise=False)))
    assert ok, msg
    assert cc.oc_layerwise is None
    cc.storage_backend.close()


def test_version_reports_the_patch_state(capsys):
    from sglang_objectcache.cli.main import main

    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert "sglang 0.5.17: supported" in out and "patch set (layer-wise streaming, storage namespaces): " in out


def test_a_stalled_stream_fails_the_gate_once_within_its_deadline():
    """A stream that stops delivering (no failure reported) must not hold the forward for one
    timeout per layer: one deadline for the load, then every later layer opens at once."""
    from sglang_objectcache.engine.readiness import LayerReadiness
    from sglang_objectcache.sglang.layer_gate import LayerGate

    readiness = LayerReadiness(LAYERS, [1] * LAYERS)
    readiness.arrived(0, 1)  # layer 0 landed, then nothing more
    stream = types.SimpleNamespace(readiness=readiness, reason=lambda: "stalled")
    gate = LayerGate([stream], LAYERS, timeout=0.3)
    t = time.monotonic()
    opened = [gate.wait(layer) for layer in range(LAYERS)]
    took = time.monotonic() - t
    assert opened[0] and not any(opened[1:])
    assert gate.failed and "layer 1 not ready" in gate.failed
    assert took < 3.0, took  # one deadline (0.3 s), not one per layer (31 x 0.3 s)


@seaweedfs_only
def test_nodes_of_a_reset_tree_are_never_dropped(tree):
    """flush_cache resets the tree: poisoned nodes of the old tree still link to each other, but
    their slots now belong to the new tree, so the clean-up must leave them alone."""
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cc = tree.cache_controller
    lw = cc.oc_layerwise
    tokens = list(range(1, 4 * PAGE + 1))
    idx = cc.mem_pool_host.alloc(len(tokens))
    tree._insert_helper_host(tree.root_node, RadixKey(tokens), idx, cc.get_hash_str(tokens, None, page_size=PAGE))
    (node,) = tree.root_node.children.values()
    assert lw._in_tree(tree, node)
    node.oc_poisoned = True
    lw._poisoned.append(node)
    tree.reset()
    free = cc.mem_pool_host.available_size()
    lw.poll(tree)
    assert not lw._in_tree(tree, node) and lw.counters["dropped_nodes"] == 0 and not lw._poisoned
    assert cc.mem_pool_host.available_size() == free


def test_gpu_summary_counts_only_the_forwards_waits_for_copies():
    """The GPU timeline line: copies' own time, their span, and the forward stream's wait, which
    is per layer the time from reaching it to its copy's end, and nothing where the copy was first."""
    from sglang_objectcache.sglang.layer_gate import gpu_summary

    class Ev:
        def __init__(self, t):
            self.t = t

        def elapsed_time(self, other):
            return other.t - self.t

    begin = [Ev(0), Ev(10), Ev(20)]
    end = [Ev(10), Ev(20), Ev(30)]
    reached = [Ev(2), Ev(5), Ev(25)]  # waits 8 at layer 0, 15 at layer 1, 5 at layer 2
    g = gpu_summary(begin, end, reached)
    assert g == {"copy_ms": 30, "span_ms": 30, "forward_waited_ms": 28, "first_reach_ms": 2}
    g = gpu_summary(begin, end, [Ev(40), Ev(41), Ev(42)])  # copies all done before the forward came
    assert g["forward_waited_ms"] == 0 and g["first_reach_ms"] == 40


@seaweedfs_only
def test_a_dead_storage_thread_of_sglang_is_named_once(tree, caplog):
    """SGLang's prefetch thread ends on an exception it does not catch; from then on no prefetch
    is answered (under wait_complete, requests wait for good). The scheduler's poll says so once,
    and says nothing while the threads are stopped on purpose (a detach)."""
    cc = tree.cache_controller
    watch = cc.oc_layerwise.threads
    assert cc.prefetch_thread.is_alive() and cc.backup_thread.is_alive()
    watch._next = 0.0
    with caplog.at_level(logging.ERROR, logger="sglang_objectcache"):
        watch.check()
    assert not caplog.records  # all alive

    alive = cc.prefetch_thread
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    cc.prefetch_thread = dead
    try:
        for _ in range(2):
            watch._next = 0.0
            with caplog.at_level(logging.ERROR, logger="sglang_objectcache"):
                cc.oc_layerwise.poll(tree)
        named = [r for r in caplog.records if "prefetch_thread has died" in r.getMessage()]
        assert len(named) == 1 and watch.dead == {"prefetch_thread"}

        caplog.clear()
        watch.dead.clear()
        cc.storage_stop_event.set()  # stopping on purpose: not a death
        try:
            watch._next = 0.0
            with caplog.at_level(logging.ERROR, logger="sglang_objectcache"):
                watch.check()
            assert not caplog.records
        finally:
            cc.storage_stop_event.clear()
    finally:
        cc.prefetch_thread = alive


def test_a_failing_gpu_timeline_is_only_a_missing_debug_line(caplog):
    """The GPU side of the timeline runs inside SGLang's result processing: whatever goes wrong
    reading CUDA events, the prefill's result must go on."""
    from sglang_objectcache.engine.readiness import LayerReadiness
    from sglang_objectcache.sglang.layer_gate import LayerGate
    from sglang_objectcache.sglang.layerwise import Layerwise

    readiness = LayerReadiness(LAYERS, [1] * LAYERS)
    stream = types.SimpleNamespace(readiness=readiness, started=time.monotonic(), op_started=None,
                                   reason=lambda: "")
    gate = LayerGate([stream], LAYERS, timeout=1.0)

    def broken():
        raise RuntimeError("events on another device")
    gate.gpu = types.SimpleNamespace(summary=broken)
    with caplog.at_level(logging.DEBUG, logger="sglang_objectcache"):
        Layerwise._log_timeline(gate)
    text = caplog.text
    assert "streamed prefill:" in text and "no GPU timeline for this prefill: events on another device" in text


def test_the_gpu_timeline_line_is_what_load_cost_reads(caplog, tmp_path):
    """benchmarks/gpu/load_cost.py reads the GPU timeline line back from a sitting's log: the two
    stay in step."""
    import importlib.util
    from pathlib import Path

    from sglang_objectcache.engine.readiness import LayerReadiness
    from sglang_objectcache.sglang.layer_gate import LayerGate
    from sglang_objectcache.sglang.layerwise import Layerwise

    stream = types.SimpleNamespace(readiness=LayerReadiness(LAYERS, [1] * LAYERS), started=time.monotonic(),
                                   op_started=None, reason=lambda: "")
    gate = LayerGate([stream], LAYERS, timeout=1.0)
    gate.gpu = types.SimpleNamespace(summary=lambda: {"copy_ms": 41.5, "span_ms": 60.5, "forward_waited_ms": 12.0,
                                                      "first_reach_ms": -3.0})
    with caplog.at_level(logging.DEBUG, logger="sglang_objectcache"):
        Layerwise._log_timeline(gate)
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "load_cost.py"
    spec = importlib.util.spec_from_file_location("load_cost", path)
    load_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_cost)
    log = tmp_path / "server.log"
    log.write_text(caplog.text)
    assert load_cost.parse_gpu(str(log)) == [(41.5, 60.5, 12.0)]


def test_a_gpu_mark_that_fails_leaves_the_layer_unmarked(monkeypatch):
    """The marks are made on the loader's and the forward's threads: a CUDA call that fails there
    must not reach either (the line is then left out: summary None)."""
    from sglang_objectcache.sglang import layer_gate

    def broken(**_):
        raise RuntimeError("no CUDA here")
    monkeypatch.setattr(layer_gate.torch.cuda, "Event", broken)
    marks = layer_gate.GpuMarks(2)
    for layer in range(2):
        marks.mark(marks.copy_begin, layer)
        marks.mark(marks.copy_end, layer)
        marks.mark(marks.reached, layer)
    assert marks.copy_begin == [None, None] and marks.summary() is None


@seaweedfs_only
def test_a_storage_query_beside_a_busy_scheduler_lowers_the_switch_interval_until_answered(tree, monkeypatch):
    """Under wait_complete a miss is admitted only once SGLang's prefetch thread has answered its
    query, and that thread must take the GIL from the scheduler first. Beside a busy scheduler
    (turns of BUSY_TURN or more) the interval is QUERY_INTERVAL from queueing to the answer
    (benchmarks/admission.py), then Python's own again; beside an idle one it is left alone."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from sglang_objectcache.sglang import layerwise
    from sglang_objectcache.sglang.layerwise import BUSY_TURN, QUERY_INTERVAL

    was = sys.getswitchinterval()

    def request(rid, tokens, turn):
        m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        tree.check_hicache_events()
        time.sleep(turn)  # the scheduler's turn: a forward, or nothing
        tree.check_hicache_events()
        tree.prefetch_from_storage(rid, m.last_host_node, tokens)
        seen = {sys.getswitchinterval()}
        deadline = time.monotonic() + 15
        while not tree.check_prefetch_progress(rid):
            assert time.monotonic() < deadline, "the miss was never admitted"
            time.sleep(turn)
            tree.check_hicache_events()
            seen.add(sys.getswitchinterval())
        tree.check_hicache_events()  # the next turn: nothing outstanding
        assert sys.getswitchinterval() == was
        return seen

    busy = request("busy", list(range(7, 7 + TOKENS)), 2 * BUSY_TURN)  # stored nowhere: misses
    assert QUERY_INTERVAL in busy
    monkeypatch.setattr(layerwise, "BUSY_TURN", 0.5)  # no turn of this test's idle scheduler is that long
    assert request("idle", list(range(9, 9 + TOKENS)), 0.0) == {was}
    tree.cache_controller.oc_layerwise.close()
    assert sys.getswitchinterval() == was


@seaweedfs_only
def test_a_storage_query_left_unanswered_is_named_once(tree, caplog, monkeypatch):
    """A prefetch thread that is alive but never answers (torch waiting on a dead build's lock, on
    the GPU machine) holds every wait_complete request that queries storage, silently: the
    scheduler's poll names the request once the query has waited STUCK_AFTER."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from sglang_objectcache.sglang import thread_watch

    monkeypatch.setattr(thread_watch, "STUCK_AFTER", 0.3)
    backend = tree.cache_controller.storage_backend
    release = threading.Event()
    answer = backend.batch_exists
    monkeypatch.setattr(backend, "batch_exists", lambda keys, extra_info=None: (release.wait(20), answer(keys))[1])
    watch = tree.cache_controller.oc_layerwise.threads
    tokens = list(range(11, 11 + TOKENS))
    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
    tree.prefetch_from_storage("stuck1", m.last_host_node, tokens)
    try:
        with caplog.at_level(logging.ERROR, logger="sglang_objectcache"):
            for _ in range(3):
                time.sleep(0.2)
                watch._next = 0.0
                tree.check_hicache_events()
        named = [r.getMessage() for r in caplog.records if "stuck1" in r.getMessage()]
        assert len(named) == 1 and "alive, so stuck" in named[0] and "py-spy dump --pid" in named[0]
        assert not tree.check_prefetch_progress("stuck1")
    finally:
        release.set()
    deadline = time.monotonic() + 15
    while not tree.check_prefetch_progress("stuck1"):
        assert time.monotonic() < deadline
        tree.check_hicache_events()
        time.sleep(0.01)
