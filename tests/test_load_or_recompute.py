"""Load or recompute, per request, through SGLang 0.5.17's real HiRadixCache and HiCacheController
(patched) with our backend behind a bandwidth-capped proxy in front of a real S3 server.

The prefill side is SGLang's own hook (`observe_prefill` on the batches it runs) fed with batches
of a GPU that prefills 250 tokens a second; the read side is measured from the real reads. A load
chosen while the tier was fast, which then slows to a crawl, is cut at about the time recomputing
would have taken (the rest is recomputed); the next request recomputes (nothing is loaded); once
the cap is lifted and the tier has been idle past `probe_after`, one load measures it again and
decisions move back to loading.
"""

from __future__ import annotations

import time
import types

import pytest

from sglang_objectcache.sglang.compat import sglang_version

pytestmark = [
    pytest.mark.usefixtures("sglang_cpu"),
    pytest.mark.skipif(sglang_version() != "0.5.17", reason="the decision hooks are in the 0.5.17 patch set"),
    pytest.mark.parametrize("s3", ["seaweedfs"], indirect=True),
]

PAGE, LAYERS, TOKENS = 16, 8, 256  # 16 pages of 128 KiB (16 KiB a layer): 2 MiB a prefix
PER_TOKEN = 4e-3  # the modelled GPU: 250 tokens/s, so recomputing a prefix takes about 1 s


def _batch(tokens: int, seconds: float):
    """What SGLang hands `observe_prefill`: a prefill batch with its launch time."""
    mode = types.SimpleNamespace(is_extend=lambda: True, is_mixed=lambda: False)
    return types.SimpleNamespace(forward_mode=mode, hicache_consumer_index=-1, extend_lens=[tokens],
                                 prefix_lens=[0], launch_ts=time.monotonic() - seconds)


def _loaded(tree, tokens, rid) -> int:
    """The scheduler's steps for a new request until it is admitted; the tokens it got from storage."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    m = tree.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
    tree.prefetch_from_storage(rid, m.last_host_node, tokens)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tree.check_hicache_events()
        if tree.check_prefetch_progress(rid):
            return tree.prefetch_loaded_tokens_by_reqid.pop(rid, 0)
        time.sleep(0.005)
    raise AssertionError("request not admitted")


def test_a_slow_tier_is_cut_at_recompute_time_then_recomputed_then_loaded_again(s3_env, prefix):
    from testbed.hiradix import build_tree, store_prefix
    from testbed.proxy import Proxy

    proxy = Proxy(s3_env.port)
    extra = {"tiers": [{"kind": "s3", "endpoint": proxy.endpoint, "bucket": s3_env.bucket, "prefix": prefix,
                        "max_connections": 2, "max_write_connections": 2, "native_reads": "off"}],
             "pages_per_object": 2, "read_range_bytes": "128KiB", "timeout": 30, "prefetch_threshold": 64,
             "layerwise": False}
    tree = build_tree(extra, layers=LAYERS, page_size=PAGE, device_tokens=4096, host_ratio=2.0)
    try:
        decide = tree.cache_controller.oc_decide
        assert decide is not None, "the patch set's hooks are attached with objectcache"
        decide.probe_after = 2.5  # idle this long, the tier is read once more before it is judged
        prompts = [[10_000 * (i + 1) + j for j in range(TOKENS)] for i in range(5)]
        for i, p in enumerate(prompts):
            store_prefix(tree, p, seed=i)
        for n in (64, 128, 256, 512, 1024, 2048, 96, 192):  # SGLang's forwards, as it runs them
            decide.observe_prefill(_batch(n, PER_TOKEN * n))
        recompute = decide.model.seconds(TOKENS, TOKENS)

        assert _loaded(tree, prompts[0], "measure") == TOKENS, "no rate measured yet: load, as SGLang would"
        assert decide.stats()["read_rates"], decide.stats()

        proxy.rate = 32 * 2**10  # the tier slows to 64 KiB/s in all: the 2 MiB would take 32 s
        t0 = time.monotonic()
        got = _loaded(tree, prompts[1], "slowed")
        waited = time.monotonic() - t0
        assert decide.decider.counters["load"] == 1, "the load was chosen on the fast measurement"
        assert got < TOKENS, "what did not arrive by the deadline is recomputed"
        assert waited < recompute * (1 + decide.margin) + 1.0, (waited, recompute)

        assert _loaded(tree, prompts[2], "slow") == 0, f"a load slower than recompute was chosen: {decide.stats()}"
        assert decide.decider.counters["recompute"] == 1, decide.stats()
        assert tree.cache_controller.storage_backend.stats()["decisions"]["recompute"] == 1  # and in /metrics

        proxy.rate = None  # the tier recovers
        time.sleep(decide.probe_after + 0.2)
        assert _loaded(tree, prompts[3], "probe") == TOKENS, "an idle tier is read again to measure it"
        assert _loaded(tree, prompts[4], "fast") == TOKENS, f"a fast tier must be loaded: {decide.stats()}"
        assert decide.decider.counters["load"] == 2, decide.stats()
    finally:
        tree.cache_controller.storage_backend.close()
        proxy.close()


def test_a_tier_that_answers_late_recomputes_short_hits_and_loads_long_ones(s3_env, prefix):
    """A distant tier: each read waits 0.25 s before its bytes flow, then 12.8 MiB/s. After reads of
    1 to 16 pages, a 4-page hit would take about 0.29 s against 0.26 s to recompute, and is
    recomputed; a 16-page hit takes about 0.41 s against 1.02 s, and is loaded. A read rate (bytes
    over time, no latency) would put the short hit at about 0.2 s and load it."""
    from testbed.hiradix import build_tree, store_prefix
    from testbed.proxy import Proxy

    proxy = Proxy(s3_env.port)
    extra = {"tiers": [{"kind": "s3", "endpoint": proxy.endpoint, "bucket": s3_env.bucket, "prefix": prefix,
                        "max_connections": 2, "max_write_connections": 2, "native_reads": "off"}],
             "pages_per_object": 16, "timeout": 30, "prefetch_threshold": PAGE, "layerwise": False}
    tree = build_tree(extra, layers=LAYERS, page_size=PAGE, device_tokens=4096, host_ratio=2.0)
    try:
        cc = tree.cache_controller
        decide = cc.oc_decide
        warm = [[7_000_000 + 1_000 * n + j for j in range(n * PAGE)] for n in (1, 2, 4, 8, 16)]
        short = [8_000_000 + j for j in range(4 * PAGE)]
        long = [9_000_000 + j for j in range(16 * PAGE)]
        for i, p in enumerate([*warm, short, long]):
            store_prefix(tree, p, seed=i)
        for n in (64, 128, 256, 512, 1024, 2048, 96, 192):
            decide.observe_prefill(_batch(n, PER_TOKEN * n))
        proxy.delay, proxy.rate = 0.25, 12.8 * 2**20
        host = cc.mem_pool_host
        for p in warm:  # reads of 1 to 16 pages, through the engine: the meter learns the tier
            idx = host.alloc(len(p))
            assert all(cc.storage_backend.batch_get_v1(cc.get_hash_str(p, None, page_size=PAGE), idx))
            host.free(idx)
        tier = cc.storage_backend.cache.tiers[0]
        meter = cc.storage_backend.cache._reads.meters[tier]
        assert 0.2 < meter.latency < 0.35, decide.stats()

        assert _loaded(tree, short, "short") == 0, f"a short hit that waits longer than it computes: {decide.stats()}"
        assert _loaded(tree, long, "long") == len(long), f"a long hit loads: {decide.stats()}"
        assert decide.decider.counters["recompute"] == 1 and decide.decider.counters["load"] == 1
    finally:
        tree.cache_controller.storage_backend.close()
        proxy.close()


def test_off_in_the_config_leaves_sglang_alone(s3_env, prefix):
    from testbed.hiradix import build_tree

    extra = {"tiers": [{"kind": "s3", "endpoint": s3_env.endpoint, "bucket": s3_env.bucket, "prefix": prefix}],
             "load_or_recompute": False}
    tree = build_tree(extra, layers=LAYERS, page_size=PAGE)
    try:
        assert tree.cache_controller.oc_decide is None
    finally:
        tree.cache_controller.storage_backend.close()
